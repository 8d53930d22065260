// AssemblyScript SDK coverage (@solo-io/proxy-runtime 0.1.8): header edits and a local response.
// Root id "as_headers". Request: adds x-as-added: yes, removes x-as-remove, and answers 403 locally
// (header x-as-local: yes, body "denied by assemblyscript\n") when x-as-deny is present.
// Response: adds x-as-response: <plugin configuration, or "hello" when empty>.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext, Context, registerRootContext, FilterHeadersStatusValues, stream_context,
  send_local_response, GrpcStatusValues, HeaderPair, Headers, log, LogLevelValues,
} from "@solo-io/proxy-runtime";

class HeadersRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new HeadersContext(context_id, this);
  }
}

class HeadersContext extends Context {
  constructor(context_id: u32, root_context: HeadersRoot) {
    super(context_id, root_context);
  }

  onRequestHeaders(header_count: u32, end_of_stream: bool): FilterHeadersStatusValues {
    if (stream_context.headers.request.get("x-as-deny") != "") {
      const headers: Headers = [];
      headers.push(new HeaderPair(String.UTF8.encode("x-as-local"), String.UTF8.encode("yes")));
      send_local_response(403, "as_denied", String.UTF8.encode("denied by assemblyscript\n"), headers,
        GrpcStatusValues.InvalidCode);
      return FilterHeadersStatusValues.StopIteration;
    }
    stream_context.headers.request.add("x-as-added", "yes");
    stream_context.headers.request.remove("x-as-remove");
    log(LogLevelValues.info, "as_headers: request headers edited");
    return FilterHeadersStatusValues.Continue;
  }

  onResponseHeaders(header_count: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const configuration = this.root_context.getConfiguration();
    stream_context.headers.response.add("x-as-response", configuration == "" ? "hello" : configuration);
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new HeadersRoot(context_id); }, "as_headers");
