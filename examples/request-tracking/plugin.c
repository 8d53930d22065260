/*
 * request-tracking: sets the request header named by pluginConfig.tracking_header (default
 * x-request-id) to "request-tracking" on every request, and logs one line when each stream is done.
 *
 * pluginConfig: {"tracking_header": "X-Request-Id"}
 */
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "plugin_util.h"
#include "proxy_wasm_abi.h"

#define TRACKING_VALUE "request-tracking"

typedef struct stream {
  uint32_t id;
  char *method;
  char *path;
  char *status;
  struct stream *next;
} stream;

static char *tracking_header; /* lower-cased; one plugin per VM in the examples */
static stream *streams;

static stream *find_stream(uint32_t id) {
  for (stream *s = streams; s; s = s->next)
    if (s->id == id) return s;
  return NULL;
}

PW_EXPORT(proxy_abi_version_0_2_1) void proxy_abi_version_0_2_1(void) {}
PW_EXPORT(proxy_on_memory_allocate) void *proxy_on_memory_allocate(size_t size) { return malloc(size); }

PW_EXPORT(proxy_on_context_create) void proxy_on_context_create(uint32_t context_id, uint32_t parent_id) {
  if (parent_id == 0) return;
  stream *s = calloc(1, sizeof(stream));
  s->id = context_id;
  s->next = streams;
  streams = s;
}

PW_EXPORT(proxy_on_vm_start) uint32_t proxy_on_vm_start(uint32_t root_id, uint32_t size) {
  (void)root_id;
  (void)size;
  return 1;
}

PW_EXPORT(proxy_on_configure) uint32_t proxy_on_configure(uint32_t root_id, uint32_t size) {
  (void)root_id;
  char *text = read_plugin_configuration(size);
  char error[160];
  json *config = json_parse(text, strlen(text), error, sizeof(error));
  free(text);
  if (!config) {
    log_pair(PW_LOG_ERROR, "request-tracking: pluginConfig is not valid JSON: ", error);
    return 0;
  }
  json *header = json_get(config, "tracking_header");
  if (header && (header->kind != JSON_STRING || header->string_len == 0)) {
    log_message(PW_LOG_ERROR, "request-tracking: pluginConfig.tracking_header must be a non-empty string");
    json_free(config);
    return 0;
  }
  free(tracking_header);
  tracking_header = copy_string(header ? header->string : "x-request-id");
  to_lower_ascii(tracking_header);
  json_free(config);
  log_pair(PW_LOG_INFO, "request-tracking: tracking header ", tracking_header);
  return 1;
}

PW_EXPORT(proxy_on_request_headers)
uint32_t proxy_on_request_headers(uint32_t context_id, uint32_t num_headers, uint32_t end_of_stream) {
  (void)num_headers;
  (void)end_of_stream;
  set_header(PW_MAP_REQUEST_HEADERS, tracking_header ? tracking_header : "x-request-id", TRACKING_VALUE);
  stream *s = find_stream(context_id);
  if (s) {
    s->method = get_header_string(PW_MAP_REQUEST_HEADERS, ":method");
    s->path = get_header_string(PW_MAP_REQUEST_HEADERS, ":path");
  }
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_response_headers)
uint32_t proxy_on_response_headers(uint32_t context_id, uint32_t num_headers, uint32_t end_of_stream) {
  (void)num_headers;
  (void)end_of_stream;
  stream *s = find_stream(context_id);
  if (s && !s->status) s->status = get_header_string(PW_MAP_RESPONSE_HEADERS, ":status");
  return PW_HEADERS_CONTINUE;
}

PW_EXPORT(proxy_on_done) uint32_t proxy_on_done(uint32_t context_id) {
  stream *s = find_stream(context_id);
  if (s) {
    /* "request-tracking: stream done: GET /path -> 200" */
    const char *parts[] = {"request-tracking: stream done: ", s->method ? s->method : "-", " ",
                           s->path ? s->path : "-", " -> ", s->status ? s->status : "-"};
    size_t total = 0;
    for (size_t i = 0; i < 6; i++) total += strlen(parts[i]);
    char *line = malloc(total + 1);
    line[0] = '\0';
    for (size_t i = 0; i < 6; i++) strcat(line, parts[i]);
    log_message(PW_LOG_INFO, line);
    free(line);
  }
  return 1;
}

PW_EXPORT(proxy_on_delete) void proxy_on_delete(uint32_t context_id) {
  stream **link = &streams;
  while (*link && (*link)->id != context_id) link = &(*link)->next;
  if (!*link) return;
  stream *s = *link;
  *link = s->next;
  free(s->method);
  free(s->path);
  free(s->status);
  free(s);
}
