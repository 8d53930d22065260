;; ABI 0.1.0 as the spec writes it: header callbacks take (context_id, num_headers), no end_of_stream.
;; Adds request header x-wat-abi: 0_1_0 and response header x-wat-abi: 0_1_0.
(module
  (import "env" "proxy_add_header_map_value" (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  ;; Bump allocator: enough for the short-lived buffers a host hands these tiny plugins.
  (global $heap (mut i32) (i32.const 4096))
  (func $malloc (export "malloc") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.and (i32.add (i32.add (global.get $heap) (local.get $size)) (i32.const 7)) (i32.const -8)))
    (block $done
      (loop $grow
        (br_if $done (i32.le_u (global.get $heap) (i32.shl (memory.size) (i32.const 16))))
        (drop (memory.grow (i32.const 1)))
        (br $grow)))
    (local.get $ptr))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (data (i32.const 64) "x-wat-abi")
  (data (i32.const 80) "0_1_0")
  (func (export "proxy_abi_version_0_1_0"))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $headers i32) (result i32)
    (drop (call $add_header (i32.const 0) (i32.const 64) (i32.const 9) (i32.const 80) (i32.const 5)))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param $ctx i32) (param $headers i32) (result i32)
    (drop (call $add_header (i32.const 2) (i32.const 64) (i32.const 9) (i32.const 80) (i32.const 5)))
    (i32.const 0)))
