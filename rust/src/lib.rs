//! Compiled data structures for Dispa, exposed to Python as `dispa._rust`.
//!
//! The cores ([`ring`]: the nginx-compatible ketama ring, [`maglev`]: the Maglev lookup
//! table, [`bounded`]: bounded-load placement over either) are plain Rust with no pyo3
//! types, so `cargo test` and `cargo bench` run without Python. The bindings (`py_ring`,
//! `py_maglev`, feature `python`) are thin `#[pyclass]` layers; this file only registers
//! them.
//!
//! ```
//! use _rust::ring::Ring;
//!
//! let ring = Ring::new(&[("127.0.0.1:8081", 1), ("127.0.0.1:8082", 1)], 160).unwrap();
//! assert_eq!(ring.lookup(b"some key"), ring.lookup(b"some key"));
//! // Bounded loads: the owner is busy, so the key spills to the next node of its walk.
//! let owner = ring.lookup(b"some key");
//! let mut loads = vec![0u64; 2];
//! loads[owner] = 10;
//! assert_ne!(ring.lookup_bounded(b"some key", &loads, 1.25).unwrap(), owner);
//! ```

pub mod bounded;
pub mod hpack;
pub mod hpack_check;
mod hpack_tables;
pub mod maglev;
pub mod ring;

#[cfg(feature = "python")]
mod hpack_py;
#[cfg(feature = "python")]
mod py_maglev;
#[cfg(feature = "python")]
mod py_ring;

#[cfg(feature = "python")]
use pyo3::prelude::*;

/// `dispa._rust`: registration only. Every object is immutable plain data, so the module
/// declares that it does not need the GIL (free-threaded builds).
#[cfg(feature = "python")]
#[pymodule(gil_used = false)]
fn _rust(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<py_ring::PyRing>()?;
    m.add_class::<py_maglev::PyMaglev>()?;
    m.add_class::<hpack_py::PyHpackEncoder>()?;
    m.add_class::<hpack_py::PyHpackDecoder>()?;
    m.add_function(wrap_pyfunction!(hpack_py::h2_check_headers, m)?)?;
    m.add_function(wrap_pyfunction!(build_info, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

/// `build_info() -> dict`: `{"version": crate version, "debug": built with debug assertions}`.
#[cfg(feature = "python")]
#[pyfunction]
fn build_info(py: Python<'_>) -> PyResult<Bound<'_, pyo3::types::PyDict>> {
    let d = pyo3::types::PyDict::new(py);
    d.set_item("version", env!("CARGO_PKG_VERSION"))?;
    d.set_item("debug", cfg!(debug_assertions))?;
    Ok(d)
}
