;; A WASI reactor whose _initialize traps (unreachable): loading must fail with a clear error.
(module
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
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "_initialize") unreachable)
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0)))
