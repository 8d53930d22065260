/*
 * framing: records how the host frames HTTP bodies for a plugin, so Envoy and wasmesh can be compared
 * over real sockets (tests/differential/test_differential_framing.py).
 *
 * Every stream callback appends one event to the stream's log:
 *   rqh:<eos>  rqb:<size>/<eos>  rqt  rsh:<eos>  rsb:<size>/<eos>  rst  log  done
 * and the log is stored as shared data under `framing/<x-framing-key>` in on_log and again in on_done,
 * so a later request `x-framing-read: <key>` (answered locally with the log as its body) reads what the
 * earlier stream saw, including its response-side and end-of-stream callbacks.
 *
 * Request headers choose what the body callbacks return (per direction, `x-framing-req` for
 * on_request_body and `x-framing-resp` for on_response_body):
 *   continue     Continue (the default)
 *   buffer       StopIterationAndBuffer until end_of_stream, then Continue
 *   nobuffer     StopIterationNoBuffer until end_of_stream, then Continue
 *   rewrite      like buffer; on the end_of_stream call the whole body is replaced (proxy_set_buffer_bytes
 *                at offset 0 over body_size bytes) by "rewritten(<size>):" + the body read back
 *   rewrite-last Continue, and on the end_of_stream call the same replacement over what that call holds
 * (both rewrite modes remove content-length in the headers callback, as body-changing plugins must)
 * `x-framing-deny: 1` answers 401 from on_request_headers (a local reply before the body is read).
 * `x-framing-log-spin-ms: N` makes on_log busy-wait N ms and store its end time (ns) under
 * `framing/<key>/log-end`, so a client can tell whether the response was sent before on_log ran.
 */
#include <stdlib.h>
#include <string.h>

#include "plugin_util.h"

enum { MODE_CONTINUE, MODE_BUFFER, MODE_NOBUFFER, MODE_REWRITE, MODE_REWRITE_LAST };
enum { PW_DATA_STOP_ITERATION_NO_BUFFER = 3 };

typedef struct stream {
  uint32_t id;
  char *key;
  int request_mode;
  int response_mode;
  uint32_t log_spin_ms;
  char *events;
  size_t events_len;
  struct stream *next;
} stream;

static stream *streams;

static stream *find_stream(uint32_t id) {
  for (stream *s = streams; s; s = s->next)
    if (s->id == id) return s;
  return NULL;
}

static void append(stream *s, const char *text) {
  size_t n = strlen(text);
  size_t sep = s->events_len ? 1 : 0;
  s->events = realloc(s->events, s->events_len + sep + n + 1);
  if (sep) s->events[s->events_len] = ',';
  memcpy(s->events + s->events_len + sep, text, n + 1);
  s->events_len += sep + n;
}

static void format_u64(char *out, uint64_t v) {
  char digits[24];
  int n = 0;
  do {
    digits[n++] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  while (n) *out++ = digits[--n];
  *out = '\0';
}

static void append_event(stream *s, const char *name, int64_t size, int64_t eos) {
  char line[64];
  strcpy(line, name);
  char *p = line + strlen(line);
  if (size >= 0) {
    *p++ = ':';
    format_u64(p, (uint64_t)size);
    p += strlen(p);
    *p++ = '/';
    format_u64(p, (uint64_t)eos);
  } else if (eos >= 0) {
    *p++ = ':';
    format_u64(p, (uint64_t)eos);
  }
  append(s, line);
}

static int mode_of(const char *header) {
  char *value = get_header_string(PW_MAP_REQUEST_HEADERS, header);
  int mode = MODE_CONTINUE;
  if (value) {
    if (strcmp(value, "buffer") == 0) mode = MODE_BUFFER;
    else if (strcmp(value, "nobuffer") == 0) mode = MODE_NOBUFFER;
    else if (strcmp(value, "rewrite") == 0) mode = MODE_REWRITE;
    else if (strcmp(value, "rewrite-last") == 0) mode = MODE_REWRITE_LAST;
  }
  free(value);
  return mode;
}

static void store(const char *key, const char *suffix, const char *value, size_t value_len) {
  size_t k = strlen(key), s = strlen(suffix);
  char *name = malloc(8 + k + s + 1);
  memcpy(name, "framing/", 8);
  memcpy(name + 8, key, k);
  memcpy(name + 8 + k, suffix, s + 1);
  proxy_set_shared_data(name, 8 + k + s, value, value_len, 0);
  free(name);
}

static void store_events(stream *s) {
  if (s->key) store(s->key, "", s->events ? s->events : "", s->events_len);
}

/* The body callbacks' answer for one frame, after the optional rewrite on the last one. */
static uint32_t body_callback(stream *s, uint32_t buffer, int mode, uint32_t body_size, uint32_t eos) {
  if (!eos) {
    if (mode == MODE_BUFFER || mode == MODE_REWRITE) return PW_DATA_STOP_ITERATION_AND_BUFFER;
    if (mode == MODE_NOBUFFER) return PW_DATA_STOP_ITERATION_NO_BUFFER;
    return PW_DATA_CONTINUE;
  }
  if (mode == MODE_REWRITE || mode == MODE_REWRITE_LAST) {
    char *old = NULL;
    size_t old_len = 0;
    if (body_size && proxy_get_buffer_bytes(buffer, 0, body_size, &old, &old_len) != PW_OK) old_len = 0;
    char prefix[48] = "rewritten(";
    format_u64(prefix + strlen(prefix), body_size);
    strcat(prefix, "):");
    size_t p = strlen(prefix);
    char *text = malloc(p + old_len + 1);
    memcpy(text, prefix, p);
    if (old_len) memcpy(text + p, old, old_len);
    pw_status status = proxy_set_buffer_bytes(buffer, 0, body_size, text, p + old_len);
    char line[32] = "set=";
    format_u64(line + 4, status);
    append(s, line);
    free(text);
    free(old);
  }
  return PW_DATA_CONTINUE;
}

PW_EXPORT(proxy_abi_version_0_2_1) void proxy_abi_version_0_2_1(void) {}

PW_EXPORT(proxy_on_memory_allocate) void *proxy_on_memory_allocate(size_t size) { return malloc(size); }

PW_EXPORT(proxy_on_vm_start) uint32_t proxy_on_vm_start(uint32_t root_id, uint32_t vm_config_size) {
  (void)root_id;
  (void)vm_config_size;
  return 1;
}

PW_EXPORT(proxy_on_configure) uint32_t proxy_on_configure(uint32_t root_id, uint32_t config_size) {
  (void)root_id;
  (void)config_size;
  return 1;
}

PW_EXPORT(proxy_on_context_create) void proxy_on_context_create(uint32_t context_id, uint32_t parent_id) {
  if (parent_id == 0) return; /* the root context keeps no state */
  stream *s = calloc(1, sizeof(stream));
  s->id = context_id;
  s->next = streams;
  streams = s;
}

PW_EXPORT(proxy_on_request_headers)
uint32_t proxy_on_request_headers(uint32_t context_id, uint32_t num_headers, uint32_t end_of_stream) {
  (void)num_headers;
  stream *s = find_stream(context_id);
  if (!s) return PW_HEADERS_CONTINUE;
  char *read_key = get_header_string(PW_MAP_REQUEST_HEADERS, "x-framing-read");
  if (read_key) {
    size_t k = strlen(read_key);
    char *name = malloc(8 + k + 1);
    memcpy(name, "framing/", 8);
    memcpy(name + 8, read_key, k + 1);
    char *value = NULL;
    size_t value_len = 0;
    uint32_t cas = 0;
    pw_status status = proxy_get_shared_data(name, 8 + k, &value, &value_len, &cas);
    char *body = malloc(value_len + 1);
    if (status == PW_OK && value_len) memcpy(body, value, value_len);
    body[status == PW_OK ? value_len : 0] = '\0';
    header_list none = {0};
    send_local_reply(status == PW_OK ? 200 : 404, "framing_read", body, &none);
    free(body);
    free(value);
    free(name);
    free(read_key);
    return PW_HEADERS_STOP_ITERATION;
  }
  s->key = get_header_string(PW_MAP_REQUEST_HEADERS, "x-framing-key");
  s->request_mode = mode_of("x-framing-req");
  s->response_mode = mode_of("x-framing-resp");
  char *spin = get_header_string(PW_MAP_REQUEST_HEADERS, "x-framing-log-spin-ms");
  if (spin) s->log_spin_ms = (uint32_t)strtoul(spin, NULL, 10);
  free(spin);
  append_event(s, "rqh", -1, end_of_stream);
  /* A plugin that changes a body drops its length (as real plugins do), so the proxy re-frames it. */
  if (s->request_mode == MODE_REWRITE || s->request_mode == MODE_REWRITE_LAST)
    proxy_remove_header_map_value(PW_MAP_REQUEST_HEADERS, "content-length", 14);
  char *deny = get_header_string(PW_MAP_REQUEST_HEADERS, "x-framing-deny");
  if (deny) {
    free(deny);
    header_list none = {0};
    send_local_reply(401, "framing_denied", "denied by framing", &none);
    return PW_HEADERS_STOP_ITERATION;
  }
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_request_body)
uint32_t proxy_on_request_body(uint32_t context_id, uint32_t body_size, uint32_t end_of_stream) {
  stream *s = find_stream(context_id);
  if (!s) return PW_DATA_CONTINUE;
  append_event(s, "rqb", body_size, end_of_stream);
  return body_callback(s, PW_BUFFER_REQUEST_BODY, s->request_mode, body_size, end_of_stream);
}

PW_EXPORT(proxy_on_request_trailers) uint32_t proxy_on_request_trailers(uint32_t context_id, uint32_t num_trailers) {
  (void)num_trailers;
  stream *s = find_stream(context_id);
  if (s) append_event(s, "rqt", -1, -1);
  return PW_TRAILERS_CONTINUE;
}

PW_EXPORT(proxy_on_response_headers)
uint32_t proxy_on_response_headers(uint32_t context_id, uint32_t num_headers, uint32_t end_of_stream) {
  (void)num_headers;
  stream *s = find_stream(context_id);
  if (!s) return PW_HEADERS_CONTINUE;
  append_event(s, "rsh", -1, end_of_stream);
  if (s->response_mode == MODE_REWRITE || s->response_mode == MODE_REWRITE_LAST)
    proxy_remove_header_map_value(PW_MAP_RESPONSE_HEADERS, "content-length", 14);
  /* What the request side saw, for tests that do not need the shared-data read-back. */
  set_header(PW_MAP_RESPONSE_HEADERS, "x-framing-request-events", s->events);
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_response_body)
uint32_t proxy_on_response_body(uint32_t context_id, uint32_t body_size, uint32_t end_of_stream) {
  stream *s = find_stream(context_id);
  if (!s) return PW_DATA_CONTINUE;
  append_event(s, "rsb", body_size, end_of_stream);
  return body_callback(s, PW_BUFFER_RESPONSE_BODY, s->response_mode, body_size, end_of_stream);
}

PW_EXPORT(proxy_on_response_trailers) uint32_t proxy_on_response_trailers(uint32_t context_id, uint32_t num_trailers) {
  (void)num_trailers;
  stream *s = find_stream(context_id);
  if (s) append_event(s, "rst", -1, -1);
  return PW_TRAILERS_CONTINUE;
}

PW_EXPORT(proxy_on_log) void proxy_on_log(uint32_t context_id) {
  stream *s = find_stream(context_id);
  if (!s) return;
  append(s, "log");
  store_events(s);
  if (s->log_spin_ms && s->key) {
    uint64_t start = 0, now = 0;
    proxy_get_current_time_nanoseconds(&start);
    do {
      proxy_get_current_time_nanoseconds(&now);
    } while (now - start < (uint64_t)s->log_spin_ms * 1000000u);
    char text[24];
    format_u64(text, now);
    store(s->key, "/log-end", text, strlen(text));
  }
}

PW_EXPORT(proxy_on_done) uint32_t proxy_on_done(uint32_t context_id) {
  stream *s = find_stream(context_id);
  if (s) {
    append(s, "done");
    store_events(s);
  }
  return 1;
}

PW_EXPORT(proxy_on_delete) void proxy_on_delete(uint32_t context_id) {
  stream **link = &streams;
  while (*link && (*link)->id != context_id) link = &(*link)->next;
  if (!*link) return;
  stream *s = *link;
  *link = s->next;
  free(s->key);
  free(s->events);
  free(s);
}
