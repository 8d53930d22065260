/*
 * callbacks: a Proxy-Wasm 0.2.1 plugin for the asynchronous callbacks (on_tick, on_queue_ready,
 * on_http_call_response), traps inside them, and the WASI environment. The same plugin, configuration
 * and requests run under Envoy and under wasmesh, and the tests compare what each reports.
 *
 * Plugin configuration: comma-separated `name=value` tokens (alone, or inside a JSON string).
 *   key=K       prefix of the shared-data keys this plugin uses (tests pick a fresh one per run)
 *   name=N      this root's name, written next to each queue item it receives
 *   tick=MS     proxy_set_tick_period_milliseconds(MS) in on_configure
 *   queue=Q     proxy_register_shared_queue(Q) in on_configure (this root receives on_queue_ready)
 *
 * Request headers (the results go to the upstream as request headers x-cb-*):
 *   x-cb-report: 1        x-cb-ticks (shared counter, every on_tick adds 1), x-cb-tick-gap-ms (smallest gap
 *                         between two ticks of this VM, or "none"), x-cb-vm-requests (requests this VM has
 *                         reported, so a fresh VM shows 1), x-cb-queue-log (what on_queue_ready dequeued:
 *                         "<name>:<item>;" per item, or "empty")
 *   x-cb-env: NAME        x-cb-env-value: getenv(NAME) through WASI environ_get, or "unset"
 *   x-cb-enqueue: ITEM    enqueue ITEM on the queue named by x-cb-queue (resolved with vm_id ""):
 *                         x-cb-enqueue-status: <resolve status>:<enqueue status>
 *   x-cb-call: CLUSTER    proxy_http_call(CLUSTER, GET x-cb-call-path or /cb-call, timeout x-cb-call-timeout
 *                         ms or 1000); the request waits for the answer, then gets x-cb-call-headers (how
 *                         many headers the answer had), x-cb-call-status (its :status or "none"),
 *                         x-cb-call-body (its body) and, for an answer with no headers,
 *                         x-cb-call-failure: <proxy_get_status result>:<code>:<message>
 *   x-cb-trap: headers    trap now, in on_request_headers
 *   x-cb-trap: tick       trap in this VM's next on_tick
 *   x-cb-trap: queue      trap in this VM's next on_queue_ready
 *   x-cb-trap: call       trap in on_http_call_response of this request's x-cb-call
 */
#include <stdlib.h>
#include <string.h>

#include "proxy_wasm_abi.h"

PW_IMPORT(proxy_get_status) pw_status proxy_get_status(uint32_t *code, char **message, size_t *message_size);

/* ------------------------------------------------------------------------------------------------ */
/* Text helpers.                                                                                    */

static char *text_concat(const char *a, const char *b) {
  size_t la = strlen(a), lb = strlen(b);
  char *out = malloc(la + lb + 1);
  memcpy(out, a, la);
  memcpy(out + la, b, lb + 1);
  return out;
}

static void u64_text(uint64_t v, char out[24]) {
  char digits[24];
  int n = 0;
  do {
    digits[n++] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  int i = 0;
  while (n) out[i++] = digits[--n];
  out[i] = '\0';
}

static uint64_t text_u64(const char *s, size_t len) {
  uint64_t v = 0;
  for (size_t i = 0; i < len && s[i] >= '0' && s[i] <= '9'; i++) v = v * 10 + (uint64_t)(s[i] - '0');
  return v;
}

/* A copy of (data, len) that is a valid header value: printable ASCII only, at most 200 bytes. */
static char *header_safe(const char *data, size_t len) {
  if (len > 200) len = 200;
  char *out = malloc(len + 1);
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)data[i];
    out[i] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
  }
  out[len] = '\0';
  return out;
}

static void log_text(uint32_t level, const char *message) { proxy_log(level, message, strlen(message)); }

/* ------------------------------------------------------------------------------------------------ */
/* Roots, streams, pending calls.                                                                   */

typedef struct root_ctx {
  uint32_t id;
  char *config;
  size_t config_len;
  struct root_ctx *next;
} root_ctx;

typedef struct stream_ctx {
  uint32_t id;
  uint32_t root_id;
  struct stream_ctx *next;
} stream_ctx;

typedef struct pending_call {
  uint32_t token;
  uint32_t stream_id;
  int trap;
  struct pending_call *next;
} pending_call;

static root_ctx *roots;
static stream_ctx *streams;
static pending_call *pending_calls;

/* VM state: a fresh VM (FAIL_RELOAD) starts from zero. */
static int trap_next_tick;
static int trap_next_queue_ready;
static uint64_t last_tick_ns;
static uint64_t smallest_tick_gap_ns;
static uint64_t vm_requests;

static root_ctx *find_root(uint32_t id) {
  for (root_ctx *r = roots; r; r = r->next)
    if (r->id == id) return r;
  return NULL;
}

static stream_ctx *find_stream(uint32_t id) {
  for (stream_ctx *s = streams; s; s = s->next)
    if (s->id == id) return s;
  return NULL;
}

static int is_name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

/* The value of token `name=` in the root's configuration (a fresh string), or NULL. Tokens are separated by
 * commas; quotes and braces around them are ignored, so the tokens may also sit in a JSON string, e.g.
 * {"tokens": "key=k,tick=100"} (a WasmPlugin's pluginConfig is always a JSON object). */
static char *config_value(const root_ctx *root, const char *name) {
  if (!root || !root->config) return NULL;
  size_t name_len = strlen(name);
  const char *text = root->config;
  size_t len = root->config_len;
  for (size_t i = 0; i + name_len < len; i++) {
    if (memcmp(text + i, name, name_len) != 0 || text[i + name_len] != '=') continue;
    if (i > 0 && is_name_char(text[i - 1])) continue;
    size_t start = i + name_len + 1, end = start;
    while (end < len && text[end] != ',' && text[end] != '"' && text[end] != '}' && text[end] != ' ') end++;
    char *out = malloc(end - start + 1);
    memcpy(out, text + start, end - start);
    out[end - start] = '\0';
    return out;
  }
  return NULL;
}

/* "<key>.<suffix>" for the root's configured key. */
static char *shared_key(const root_ctx *root, const char *suffix) {
  char *key = config_value(root, "key");
  char *dotted = text_concat(key ? key : "cb", ".");
  char *out = text_concat(dotted, suffix);
  free(key);
  free(dotted);
  return out;
}

/* ------------------------------------------------------------------------------------------------ */
/* Host-call wrappers.                                                                              */

static char *request_header(const char *name) {
  char *value = NULL;
  size_t len = 0;
  if (proxy_get_header_map_value(PW_MAP_REQUEST_HEADERS, name, strlen(name), &value, &len) != PW_OK) return NULL;
  char *out = malloc(len + 1);
  if (len) memcpy(out, value, len);
  out[len] = '\0';
  free(value);
  return out;
}

static char *map_value(uint32_t map, const char *name) {
  char *value = NULL;
  size_t len = 0;
  if (proxy_get_header_map_value(map, name, strlen(name), &value, &len) != PW_OK) return NULL;
  char *out = header_safe(value ? value : "", len);
  free(value);
  return out;
}

static void set_request_header(const char *name, const char *value) {
  proxy_replace_header_map_value(PW_MAP_REQUEST_HEADERS, name, strlen(name), value, strlen(value));
}

/* Shared data value as text (NULL if absent) and its CAS. */
static char *shared_get(const char *key, uint32_t *cas) {
  char *value = NULL;
  size_t len = 0;
  *cas = 0;
  if (proxy_get_shared_data(key, strlen(key), &value, &len, cas) != PW_OK) return NULL;
  char *out = malloc(len + 1);
  if (len) memcpy(out, value, len);
  out[len] = '\0';
  free(value);
  return out;
}

/* Append `text` to a shared-data value, retrying on CAS mismatch. */
static void shared_append(const char *key, const char *text) {
  for (int attempt = 0; attempt < 16; attempt++) {
    uint32_t cas = 0;
    char *old = shared_get(key, &cas);
    char *joined = text_concat(old ? old : "", text);
    pw_status status = proxy_set_shared_data(key, strlen(key), joined, strlen(joined), cas);
    free(old);
    free(joined);
    if (status != PW_CAS_MISMATCH) return;
  }
}

static void shared_count(const char *key) {
  for (int attempt = 0; attempt < 16; attempt++) {
    uint32_t cas = 0;
    char *old = shared_get(key, &cas);
    char next[24];
    u64_text((old ? text_u64(old, strlen(old)) : 0) + 1, next);
    pw_status status = proxy_set_shared_data(key, strlen(key), next, strlen(next), cas);
    free(old);
    if (status != PW_CAS_MISMATCH) return;
  }
}

static pw_status start_call(const char *cluster, const char *path, uint32_t timeout_ms, uint32_t *token) {
  const char *keys[] = {":method", ":path", ":authority"};
  const char *values[] = {"GET", path, "cb-call"};
  size_t total = 4 + 8 * 3;
  for (int i = 0; i < 3; i++) total += strlen(keys[i]) + 1 + strlen(values[i]) + 1;
  char *pairs = malloc(total);
  pw_write_u32(pairs, 3);
  char *w = pairs + 4 + 8 * 3;
  for (int i = 0; i < 3; i++) {
    size_t kl = strlen(keys[i]), vl = strlen(values[i]);
    pw_write_u32(pairs + 4 + 8 * i, (uint32_t)kl);
    pw_write_u32(pairs + 4 + 8 * i + 4, (uint32_t)vl);
    memcpy(w, keys[i], kl + 1);
    w += kl + 1;
    memcpy(w, values[i], vl + 1);
    w += vl + 1;
  }
  pw_status status = proxy_http_call(cluster, strlen(cluster), pairs, total, "", 0, NULL, 0, timeout_ms, token);
  free(pairs);
  return status;
}

/* ------------------------------------------------------------------------------------------------ */
/* Exports.                                                                                         */

PW_EXPORT(proxy_abi_version_0_2_1) void proxy_abi_version_0_2_1(void) {}

PW_EXPORT(proxy_on_memory_allocate) void *proxy_on_memory_allocate(size_t size) { return malloc(size); }

PW_EXPORT(proxy_on_context_create) void proxy_on_context_create(uint32_t context_id, uint32_t parent_id) {
  if (parent_id == 0) {
    root_ctx *root = calloc(1, sizeof(root_ctx));
    root->id = context_id;
    root->next = roots;
    roots = root;
    return;
  }
  stream_ctx *s = calloc(1, sizeof(stream_ctx));
  s->id = context_id;
  s->root_id = parent_id;
  s->next = streams;
  streams = s;
}

PW_EXPORT(proxy_on_vm_start) uint32_t proxy_on_vm_start(uint32_t root_id, uint32_t vm_config_size) {
  (void)root_id;
  (void)vm_config_size;
  return 1;
}

PW_EXPORT(proxy_on_configure) uint32_t proxy_on_configure(uint32_t root_id, uint32_t config_size) {
  root_ctx *root = find_root(root_id);
  if (!root) return 0;
  char *data = NULL;
  size_t len = 0;
  if (config_size && proxy_get_buffer_bytes(PW_BUFFER_PLUGIN_CONFIGURATION, 0, config_size, &data, &len) == PW_OK) {
    root->config = data;
    root->config_len = len;
  }
  char *tick = config_value(root, "tick");
  if (tick) proxy_set_tick_period_milliseconds((uint32_t)text_u64(tick, strlen(tick)));
  free(tick);
  char *queue = config_value(root, "queue");
  if (queue) {
    uint32_t token = 0;
    if (proxy_register_shared_queue(queue, strlen(queue), &token) != PW_OK) log_text(PW_LOG_ERROR, "callbacks: register failed");
  }
  free(queue);
  return 1;
}

PW_EXPORT(proxy_on_tick) void proxy_on_tick(uint32_t root_id) {
  if (trap_next_tick) {
    log_text(PW_LOG_WARN, "callbacks: trapping in on_tick");
    __builtin_trap();
  }
  uint64_t now = 0;
  proxy_get_current_time_nanoseconds(&now);
  if (last_tick_ns && now > last_tick_ns) {
    uint64_t gap = now - last_tick_ns;
    if (!smallest_tick_gap_ns || gap < smallest_tick_gap_ns) smallest_tick_gap_ns = gap;
  }
  last_tick_ns = now;
  char *key = shared_key(find_root(root_id), "ticks");
  shared_count(key);
  free(key);
}

PW_EXPORT(proxy_on_queue_ready) void proxy_on_queue_ready(uint32_t root_id, uint32_t token) {
  if (trap_next_queue_ready) {
    log_text(PW_LOG_WARN, "callbacks: trapping in on_queue_ready");
    __builtin_trap();
  }
  root_ctx *root = find_root(root_id);
  char *name = config_value(root, "name");
  char *key = shared_key(root, "queue-log");
  char *item = NULL;
  size_t len = 0;
  while (proxy_dequeue_shared_queue(token, &item, &len) == PW_OK) {
    char *safe = header_safe(item ? item : "", len);
    char *entry = text_concat(name ? name : "unnamed", ":");
    char *with_item = text_concat(entry, safe);
    char *line = text_concat(with_item, ";");
    shared_append(key, line);
    free(safe);
    free(entry);
    free(with_item);
    free(line);
    free(item);
    item = NULL;
  }
  free(name);
  free(key);
}

PW_EXPORT(proxy_on_http_call_response)
void proxy_on_http_call_response(uint32_t root_id, uint32_t token, uint32_t num_headers, uint32_t body_size,
                                 uint32_t num_trailers) {
  (void)root_id;
  (void)num_trailers;
  pending_call **link = &pending_calls;
  while (*link && (*link)->token != token) link = &(*link)->next;
  if (!*link) return;
  pending_call *call = *link;
  *link = call->next;
  uint32_t stream_id = call->stream_id;
  int trap = call->trap;
  free(call);
  if (trap) {
    log_text(PW_LOG_WARN, "callbacks: trapping in on_http_call_response");
    __builtin_trap();
  }
  char number[24];
  u64_text(num_headers, number);
  char *status = map_value(PW_MAP_HTTP_CALL_RESPONSE_HEADERS, ":status");
  char *body = NULL;
  size_t body_len = 0;
  char *safe_body = NULL;
  if (body_size && proxy_get_buffer_bytes(PW_BUFFER_HTTP_CALL_RESPONSE_BODY, 0, body_size, &body, &body_len) == PW_OK)
    safe_body = header_safe(body ? body : "", body_len);
  free(body);
  char *failure = NULL;
  if (num_headers == 0) {
    uint32_t code = 0;
    char *message = NULL;
    size_t message_len = 0;
    pw_status got = proxy_get_status(&code, &message, &message_len);
    char got_text[24], code_text[24];
    u64_text(got, got_text);
    u64_text(code, code_text);
    char *safe_message = header_safe(message ? message : "", message_len);
    char *a = text_concat(got_text, ":");
    char *b = text_concat(a, code_text);
    char *c = text_concat(b, ":");
    failure = text_concat(c, safe_message);
    free(a);
    free(b);
    free(c);
    free(safe_message);
    free(message);
  }
  if (!find_stream(stream_id) || proxy_set_effective_context(stream_id) != PW_OK) {
    free(status);
    free(safe_body);
    free(failure);
    return;
  }
  set_request_header("x-cb-call-headers", number);
  set_request_header("x-cb-call-status", status ? status : "none");
  set_request_header("x-cb-call-body", safe_body ? safe_body : "");
  if (failure) set_request_header("x-cb-call-failure", failure);
  free(status);
  free(safe_body);
  free(failure);
  proxy_continue_stream(PW_STREAM_REQUEST);
}

static void report(root_ctx *root) {
  char number[24];
  vm_requests++;
  u64_text(vm_requests, number);
  set_request_header("x-cb-vm-requests", number);
  char *key = shared_key(root, "ticks");
  uint32_t cas = 0;
  char *ticks = shared_get(key, &cas);
  set_request_header("x-cb-ticks", ticks ? ticks : "0");
  free(ticks);
  free(key);
  if (smallest_tick_gap_ns) {
    u64_text(smallest_tick_gap_ns / 1000000, number);
    set_request_header("x-cb-tick-gap-ms", number);
  } else {
    set_request_header("x-cb-tick-gap-ms", "none");
  }
  key = shared_key(root, "queue-log");
  char *log = shared_get(key, &cas);
  char *safe = log ? header_safe(log, strlen(log)) : NULL;
  set_request_header("x-cb-queue-log", safe && *safe ? safe : "empty");
  free(safe);
  free(log);
  free(key);
}

PW_EXPORT(proxy_on_request_headers)
uint32_t proxy_on_request_headers(uint32_t context_id, uint32_t num_headers, uint32_t end_of_stream) {
  (void)num_headers;
  (void)end_of_stream;
  stream_ctx *s = find_stream(context_id);
  root_ctx *root = s ? find_root(s->root_id) : NULL;
  char *trap = request_header("x-cb-trap");
  int trap_call = 0;
  if (trap) {
    if (strcmp(trap, "headers") == 0) {
      log_text(PW_LOG_WARN, "callbacks: trapping in on_request_headers");
      __builtin_trap();
    }
    if (strcmp(trap, "tick") == 0) trap_next_tick = 1;
    if (strcmp(trap, "queue") == 0) trap_next_queue_ready = 1;
    if (strcmp(trap, "call") == 0) trap_call = 1;
    free(trap);
  }

  char *env = request_header("x-cb-env");
  if (env) {
    const char *value = getenv(env);
    char *safe = value ? header_safe(value, strlen(value)) : NULL;
    set_request_header("x-cb-env-value", safe ? safe : "unset");
    free(safe);
    free(env);
  }

  char *item = request_header("x-cb-enqueue");
  if (item) {
    char *queue = request_header("x-cb-queue");
    uint32_t token = 0;
    pw_status resolved = proxy_resolve_shared_queue("", 0, queue ? queue : "", queue ? strlen(queue) : 0, &token);
    pw_status enqueued = resolved == PW_OK ? proxy_enqueue_shared_queue(token, item, strlen(item)) : PW_NOT_FOUND;
    char a[24], b[24];
    u64_text(resolved, a);
    u64_text(enqueued, b);
    char *colon = text_concat(a, ":");
    char *both = text_concat(colon, b);
    set_request_header("x-cb-enqueue-status", both);
    free(colon);
    free(both);
    free(queue);
    free(item);
  }

  char *wants_report = request_header("x-cb-report");
  if (wants_report) {
    report(root);
    free(wants_report);
  }

  char *cluster = request_header("x-cb-call");
  if (cluster) {
    char *path = request_header("x-cb-call-path");
    char *timeout = request_header("x-cb-call-timeout");
    uint32_t timeout_ms = timeout ? (uint32_t)text_u64(timeout, strlen(timeout)) : 1000;
    uint32_t token = 0;
    pw_status status = start_call(cluster, path ? path : "/cb-call", timeout_ms, &token);
    free(path);
    free(timeout);
    free(cluster);
    if (status == PW_OK) {
      pending_call *call = calloc(1, sizeof(pending_call));
      call->token = token;
      call->stream_id = context_id;
      call->trap = trap_call;
      call->next = pending_calls;
      pending_calls = call;
      return PW_HEADERS_STOP_ITERATION;
    }
    char number[24];
    u64_text(status, number);
    set_request_header("x-cb-call-dispatch", number);
  }
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_done) uint32_t proxy_on_done(uint32_t context_id) {
  (void)context_id;
  return 1;
}

PW_EXPORT(proxy_on_delete) void proxy_on_delete(uint32_t context_id) {
  stream_ctx **link = &streams;
  while (*link && (*link)->id != context_id) link = &(*link)->next;
  if (*link) {
    stream_ctx *gone = *link;
    *link = gone->next;
    free(gone);
  }
}
