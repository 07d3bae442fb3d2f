;; A complete Dispa WASM plugin in WebAssembly text (docs/plugins-wasm.md).
;;
;; Request stage: adds "x-wasm-plugin: add_header" to the request sent upstream.
;; Response stage: adds "x-served-by: dispa-wasm" to the response.
;;
;; The allocator is a bump pointer reset by dealloc: the host frees both buffers of an
;; exchange after reading the result, so nothing outlives one exchange. A real plugin
;; (Rust, TinyGo, AssemblyScript...) uses its language's allocator instead.
(module
  (memory (export "memory") 1)

  (data (i32.const 1024) "{\"set_headers\":{\"x-wasm-plugin\":\"add_header\"}}")
  (data (i32.const 2048) "{\"set_headers\":{\"x-served-by\":\"dispa-wasm\"}}")

  (global $heap (mut i32) (i32.const 8192))
  (global $result_len (mut i32) (i32.const 0))

  ;; alloc(len) -> ptr, growing memory when needed; 0 when memory cannot grow
  (func (export "alloc") (param $n i32) (result i32)
    (local $p i32) (local $end i32) (local $have i32)
    (local.set $p (global.get $heap))
    (local.set $end (i32.add (local.get $p) (local.get $n)))
    (local.set $have (i32.mul (memory.size) (i32.const 65536)))
    (if (i32.gt_u (local.get $end) (local.get $have))
      (then
        (if (i32.eq
              (memory.grow (i32.add (i32.shr_u (i32.sub (local.get $end) (local.get $have))
                                               (i32.const 16))
                                    (i32.const 1)))
              (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $heap (local.get $end))
    (local.get $p))

  (func (export "dealloc") (param $ptr i32) (param $len i32)
    (global.set $heap (i32.const 8192)))

  (func (export "dispa_get_result_len") (result i32)
    (global.get $result_len))

  ;; the input JSON is at [ptr, ptr+len); this plugin ignores it
  (func (export "dispa_on_request") (param $ptr i32) (param $len i32) (result i32)
    (global.set $result_len (i32.const 46))
    (i32.const 1024))

  (func (export "dispa_on_response") (param $ptr i32) (param $len i32) (result i32)
    (global.set $result_len (i32.const 44))
    (i32.const 2048))
)
