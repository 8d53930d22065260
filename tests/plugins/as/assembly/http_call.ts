// AssemblyScript SDK coverage (@solo-io/proxy-runtime 0.1.8): the SDK's http_call dispatch.
// Root id "as_http_call". Each request is paused while GET /probe-call goes to the cluster named by
// the plugin configuration (default "probe_call"); when the answer arrives the SDK switches to the
// request's context (set_effective_context) and the plugin adds x-as-call-status: <:status> and
// x-as-call-body: <body> to the request, then resumes it. A failed dispatch adds x-as-call-status:
// dispatch-failed and continues at once.
// SDK 0.1.8 caveats: on_configure traps on an empty configuration (it passes the size as the size
// pointer), so always configure a cluster name; and its buffer reads free the host buffer before use,
// so the callback keeps string handling minimal (a `status == "" ? ... : ...` here corrupted memory).
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext, Context, BaseContext, registerRootContext, FilterHeadersStatusValues, stream_context,
  HeaderPair, Headers, WasmResultValues, log, LogLevelValues,
} from "@solo-io/proxy-runtime";
import { get_buffer_bytes, BufferTypeValues } from "@solo-io/proxy-runtime/runtime";

function pair(key: string, value: string): HeaderPair {
  return new HeaderPair(String.UTF8.encode(key), String.UTF8.encode(value));
}

class HttpCallRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new HttpCallContext(context_id, this);
  }
}

class HttpCallContext extends Context {
  constructor(context_id: u32, root_context: HttpCallRoot) {
    super(context_id, root_context);
  }

  onRequestHeaders(header_count: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const configuration = this.root_context.getConfiguration();
    const cluster = configuration == "" ? "probe_call" : configuration;
    const headers: Headers = [];
    headers.push(pair(":method", "GET"));
    headers.push(pair(":path", "/probe-call"));
    headers.push(pair(":authority", "as-call"));
    const result = this.root_context.httpCall(cluster, headers, new ArrayBuffer(0), [], 5000, this,
      (origin: BaseContext, header_count: u32, body_size: usize, trailer_count: u32): void => {
        const status = stream_context.headers.http_callback.get(":status");
        stream_context.headers.request.add("x-as-call-status", status);
        const body = String.UTF8.decode(get_buffer_bytes(BufferTypeValues.HttpCallResponseBody, 0, body_size as u32));
        stream_context.headers.request.add("x-as-call-body", body);
        origin.continueRequest();
      });
    if (result != WasmResultValues.Ok) {
      log(LogLevelValues.warn, "as_http_call: dispatch failed: " + result.toString());
      stream_context.headers.request.add("x-as-call-status", "dispatch-failed");
      return FilterHeadersStatusValues.Continue;
    }
    return FilterHeadersStatusValues.StopIteration;
  }
}

registerRootContext((context_id: u32) => { return new HttpCallRoot(context_id); }, "as_http_call");
