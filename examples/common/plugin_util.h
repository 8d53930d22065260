/*
 * Helpers shared by the example plugins: logging, reading the plugin configuration, header access,
 * and building the pair-serialized header list that proxy_send_local_response takes.
 */
#ifndef WASMESH_EXAMPLES_PLUGIN_UTIL_H
#define WASMESH_EXAMPLES_PLUGIN_UTIL_H

#include <stdlib.h>
#include <string.h>

#include "proxy_wasm_abi.h"

static inline void log_message(uint32_t level, const char *message) { proxy_log(level, message, strlen(message)); }

/* Logs `prefix` followed by `detail` as one line. */
static inline void log_pair(uint32_t level, const char *prefix, const char *detail) {
  size_t a = strlen(prefix), b = strlen(detail);
  char *line = malloc(a + b + 1);
  memcpy(line, prefix, a);
  memcpy(line + a, detail, b + 1);
  proxy_log(level, line, a + b);
  free(line);
}

/* The plugin configuration as a malloc'd NUL-terminated string ("" when there is none). */
static inline char *read_plugin_configuration(uint32_t size) {
  char *data = NULL;
  size_t len = 0;
  if (size == 0 || proxy_get_buffer_bytes(PW_BUFFER_PLUGIN_CONFIGURATION, 0, size, &data, &len) != PW_OK) {
    free(data);
    data = NULL;
    len = 0;
  }
  char *text = malloc(len + 1);
  if (len) memcpy(text, data, len);
  text[len] = '\0';
  free(data);
  return text;
}

/* A header value as a malloc'd NUL-terminated string, or NULL when the header is absent. */
static inline char *get_header_string(uint32_t map, const char *name) {
  char *value = NULL;
  size_t len = 0;
  if (proxy_get_header_map_value(map, name, strlen(name), &value, &len) != PW_OK) {
    free(value);
    return NULL;
  }
  char *text = malloc(len + 1);
  if (len) memcpy(text, value, len);
  text[len] = '\0';
  free(value);
  return text;
}

static inline pw_status set_header(uint32_t map, const char *name, const char *value) {
  return proxy_replace_header_map_value(map, name, strlen(name), value, strlen(value));
}

/* Serialized header pairs: u32 count, count × (u32 key_len, u32 value_len), then "key\0value\0"… */
typedef struct {
  const char *names[8];
  const char *values[8];
  uint32_t count;
} header_list;

static inline void header_list_add(header_list *list, const char *name, const char *value) {
  if (list->count < 8) {
    list->names[list->count] = name;
    list->values[list->count] = value;
    list->count++;
  }
}

static inline char *header_list_serialize(const header_list *list, size_t *out_len) {
  size_t total = 4 + 8 * (size_t)list->count;
  for (uint32_t i = 0; i < list->count; i++) total += strlen(list->names[i]) + 1 + strlen(list->values[i]) + 1;
  char *buffer = malloc(total);
  pw_write_u32(buffer, list->count);
  char *data = buffer + 4 + 8 * (size_t)list->count;
  for (uint32_t i = 0; i < list->count; i++) {
    size_t name_len = strlen(list->names[i]), value_len = strlen(list->values[i]);
    pw_write_u32(buffer + 4 + 8 * i, (uint32_t)name_len);
    pw_write_u32(buffer + 4 + 8 * i + 4, (uint32_t)value_len);
    memcpy(data, list->names[i], name_len + 1);
    data += name_len + 1;
    memcpy(data, list->values[i], value_len + 1);
    data += value_len + 1;
  }
  *out_len = total;
  return buffer;
}

static inline pw_status send_local_reply(uint32_t status, const char *details, const char *body, const header_list *headers) {
  size_t headers_len = 0;
  char *serialized = header_list_serialize(headers, &headers_len);
  pw_status result = proxy_send_local_response(status, details, strlen(details), body, strlen(body), serialized,
                                               headers_len, PW_NO_GRPC_STATUS);
  free(serialized);
  return result;
}

static inline char *copy_string(const char *text) {
  size_t n = strlen(text);
  char *copy = malloc(n + 1);
  memcpy(copy, text, n + 1);
  return copy;
}

static inline void to_lower_ascii(char *text) {
  for (; *text; text++)
    if (*text >= 'A' && *text <= 'Z') *text = (char)(*text - 'A' + 'a');
}

#endif
