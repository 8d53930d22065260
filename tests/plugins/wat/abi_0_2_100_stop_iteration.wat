;; Higress ABI 0_2_100: a headers StopIteration (1) is honoured as is (not turned into StopAll), so the
;; body keeps flowing while the headers are held. on_request_headers stops unless the request has no
;; body; on_request_body at end of stream adds x-wat-added-in-body: yes to the held request headers and
;; continues, so the upstream sees a header that could only have been added after the body arrived.
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
  (data (i32.const 64) "x-wat-added-in-body")
  (data (i32.const 96) "yes")
  (func (export "proxy_abi_version_0_2_100"))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $headers i32) (param $eos i32) (result i32)
    (if (result i32) (local.get $eos) (then (i32.const 0)) (else (i32.const 1))))
  (func (export "proxy_on_request_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (if (local.get $eos)
      (then (drop (call $add_header (i32.const 0) (i32.const 64) (i32.const 19) (i32.const 96) (i32.const 3)))))
    (i32.const 0)))
