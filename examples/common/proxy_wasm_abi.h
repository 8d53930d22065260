/*
 * Proxy-Wasm ABI 0.2.1 declared directly against the host imports, with no SDK.
 *
 * Written for wasmesh's example and test plugins (clang --target=wasm32-wasi, WASI reactor).
 * Every host function lives in the "env" module and returns a proxy_status_t; values the
 * host hands back are written through *_ptr / *_size out-parameters, and any buffer the
 * host returns was allocated with our exported malloc, so the plugin frees it.
 */
#ifndef WASMESH_PROXY_WASM_ABI_H
#define WASMESH_PROXY_WASM_ABI_H

#include <stddef.h>
#include <stdint.h>

#define PW_IMPORT(name) __attribute__((import_module("env"), import_name(#name)))
#define PW_EXPORT(name) __attribute__((export_name(#name)))

/* proxy_status_t */
enum {
  PW_OK = 0,
  PW_NOT_FOUND = 1,
  PW_BAD_ARGUMENT = 2,
  PW_SERIALIZATION_FAILURE = 3,
  PW_PARSE_FAILURE = 4,
  PW_INVALID_MEMORY_ACCESS = 6,
  PW_EMPTY = 7,
  PW_CAS_MISMATCH = 8,
  PW_INTERNAL_FAILURE = 10,
  PW_UNIMPLEMENTED = 12,
};

/* proxy_log_level_t */
enum { PW_LOG_TRACE = 0, PW_LOG_DEBUG = 1, PW_LOG_INFO = 2, PW_LOG_WARN = 3, PW_LOG_ERROR = 4, PW_LOG_CRITICAL = 5 };

/* Header callback results (Envoy FilterHeadersStatus). */
enum { PW_HEADERS_CONTINUE = 0, PW_HEADERS_STOP_ITERATION = 1 };
/* Body callback results (Envoy FilterDataStatus). */
enum { PW_DATA_CONTINUE = 0, PW_DATA_STOP_ITERATION_AND_BUFFER = 1 };
/* Trailer callback results. */
enum { PW_TRAILERS_CONTINUE = 0, PW_TRAILERS_STOP_ITERATION = 1 };

/* proxy_map_type_t */
enum {
  PW_MAP_REQUEST_HEADERS = 0,
  PW_MAP_REQUEST_TRAILERS = 1,
  PW_MAP_RESPONSE_HEADERS = 2,
  PW_MAP_RESPONSE_TRAILERS = 3,
  PW_MAP_HTTP_CALL_RESPONSE_HEADERS = 6,
  PW_MAP_HTTP_CALL_RESPONSE_TRAILERS = 7,
};

/* proxy_buffer_type_t */
enum {
  PW_BUFFER_REQUEST_BODY = 0,
  PW_BUFFER_RESPONSE_BODY = 1,
  PW_BUFFER_HTTP_CALL_RESPONSE_BODY = 4,
  PW_BUFFER_VM_CONFIGURATION = 6,
  PW_BUFFER_PLUGIN_CONFIGURATION = 7,
};

/* proxy_stream_type_t */
enum { PW_STREAM_REQUEST = 0, PW_STREAM_RESPONSE = 1 };

/* proxy_metric_type_t */
enum { PW_METRIC_COUNTER = 0, PW_METRIC_GAUGE = 1, PW_METRIC_HISTOGRAM = 2 };

/* gRPC status meaning "not a gRPC reply" for proxy_send_local_response. */
#define PW_NO_GRPC_STATUS (-1)

typedef uint32_t pw_status;

PW_IMPORT(proxy_log) pw_status proxy_log(uint32_t level, const char *message, size_t message_size);
PW_IMPORT(proxy_get_log_level) pw_status proxy_get_log_level(uint32_t *level);
PW_IMPORT(proxy_get_current_time_nanoseconds) pw_status proxy_get_current_time_nanoseconds(uint64_t *nanoseconds);
PW_IMPORT(proxy_set_tick_period_milliseconds) pw_status proxy_set_tick_period_milliseconds(uint32_t period);

PW_IMPORT(proxy_get_buffer_bytes)
pw_status proxy_get_buffer_bytes(uint32_t buffer_type, uint32_t start, uint32_t max_size, char **data, size_t *size);
PW_IMPORT(proxy_get_buffer_status)
pw_status proxy_get_buffer_status(uint32_t buffer_type, size_t *length, uint32_t *flags);
PW_IMPORT(proxy_set_buffer_bytes)
pw_status proxy_set_buffer_bytes(uint32_t buffer_type, uint32_t start, uint32_t size, const char *data, size_t data_size);

PW_IMPORT(proxy_get_header_map_pairs) pw_status proxy_get_header_map_pairs(uint32_t map_type, char **data, size_t *size);
PW_IMPORT(proxy_set_header_map_pairs) pw_status proxy_set_header_map_pairs(uint32_t map_type, const char *data, size_t size);
PW_IMPORT(proxy_get_header_map_size) pw_status proxy_get_header_map_size(uint32_t map_type, size_t *size);
PW_IMPORT(proxy_get_header_map_value)
pw_status proxy_get_header_map_value(uint32_t map_type, const char *key, size_t key_size, char **value, size_t *value_size);
PW_IMPORT(proxy_add_header_map_value)
pw_status proxy_add_header_map_value(uint32_t map_type, const char *key, size_t key_size, const char *value,
                                     size_t value_size);
PW_IMPORT(proxy_replace_header_map_value)
pw_status proxy_replace_header_map_value(uint32_t map_type, const char *key, size_t key_size, const char *value,
                                         size_t value_size);
PW_IMPORT(proxy_remove_header_map_value)
pw_status proxy_remove_header_map_value(uint32_t map_type, const char *key, size_t key_size);

PW_IMPORT(proxy_get_property)
pw_status proxy_get_property(const char *path, size_t path_size, char **value, size_t *value_size);
PW_IMPORT(proxy_set_property)
pw_status proxy_set_property(const char *path, size_t path_size, const char *value, size_t value_size);

PW_IMPORT(proxy_continue_stream) pw_status proxy_continue_stream(uint32_t stream_type);
PW_IMPORT(proxy_close_stream) pw_status proxy_close_stream(uint32_t stream_type);
PW_IMPORT(proxy_send_local_response)
pw_status proxy_send_local_response(uint32_t status_code, const char *details, size_t details_size, const char *body,
                                    size_t body_size, const char *headers, size_t headers_size, int32_t grpc_status);

PW_IMPORT(proxy_http_call)
pw_status proxy_http_call(const char *upstream, size_t upstream_size, const char *headers, size_t headers_size,
                          const char *body, size_t body_size, const char *trailers, size_t trailers_size,
                          uint32_t timeout_ms, uint32_t *token);
PW_IMPORT(proxy_set_effective_context) pw_status proxy_set_effective_context(uint32_t context_id);
PW_IMPORT(proxy_done) pw_status proxy_done(void);

PW_IMPORT(proxy_get_shared_data)
pw_status proxy_get_shared_data(const char *key, size_t key_size, char **value, size_t *value_size, uint32_t *cas);
PW_IMPORT(proxy_set_shared_data)
pw_status proxy_set_shared_data(const char *key, size_t key_size, const char *value, size_t value_size, uint32_t cas);

PW_IMPORT(proxy_register_shared_queue)
pw_status proxy_register_shared_queue(const char *name, size_t name_size, uint32_t *token);
PW_IMPORT(proxy_resolve_shared_queue)
pw_status proxy_resolve_shared_queue(const char *vm_id, size_t vm_id_size, const char *name, size_t name_size,
                                     uint32_t *token);
PW_IMPORT(proxy_enqueue_shared_queue) pw_status proxy_enqueue_shared_queue(uint32_t token, const char *data, size_t size);
PW_IMPORT(proxy_dequeue_shared_queue) pw_status proxy_dequeue_shared_queue(uint32_t token, char **data, size_t *size);

PW_IMPORT(proxy_define_metric)
pw_status proxy_define_metric(uint32_t metric_type, const char *name, size_t name_size, uint32_t *metric_id);
PW_IMPORT(proxy_increment_metric) pw_status proxy_increment_metric(uint32_t metric_id, int64_t offset);
PW_IMPORT(proxy_record_metric) pw_status proxy_record_metric(uint32_t metric_id, uint64_t value);
PW_IMPORT(proxy_get_metric) pw_status proxy_get_metric(uint32_t metric_id, uint64_t *value);

PW_IMPORT(proxy_call_foreign_function)
pw_status proxy_call_foreign_function(const char *name, size_t name_size, const char *args, size_t args_size,
                                      char **result, size_t *result_size);

/* ---- helpers for the pair serialization of header maps (u32 count, sizes, NUL-terminated data) ---- */

static inline uint32_t pw_read_u32(const char *p) {
  const unsigned char *b = (const unsigned char *)p;
  return (uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16) | ((uint32_t)b[3] << 24);
}

static inline void pw_write_u32(char *p, uint32_t v) {
  unsigned char *b = (unsigned char *)p;
  b[0] = (unsigned char)v;
  b[1] = (unsigned char)(v >> 8);
  b[2] = (unsigned char)(v >> 16);
  b[3] = (unsigned char)(v >> 24);
}

#endif
