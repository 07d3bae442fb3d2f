//! `dispa._rust.Ring`: the pyo3 binding of [`crate::ring::Ring`].
//!
//! Only plain data crosses: `str`/`int` nodes, `bytes` keys, `list[int]` loads and a `float`
//! factor in; `int`/`list[int]` out.
//! The object holds no Python references (nothing for the GC to traverse, safe across
//! `fork`). Lookups keep the GIL: releasing it would cost more than the lookup itself.
//! Docstrings for Python users live in `dispa/_rust.pyi`.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use crate::bounded::BoundedError;
use crate::ring::{Ring, RingError, DEFAULT_POINTS_PER_WEIGHT};

fn to_py_err(e: RingError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Bounded-load errors are `ValueError`s too (shared with `py_maglev`).
pub(crate) fn bounded_err(e: BoundedError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// `[f(k) for k in keys]` for a list of `bytes` (shared with `py_maglev`).
pub(crate) fn map_keys<'py>(
    py: Python<'py>,
    keys: &Bound<'py, PyList>,
    f: impl Fn(&[u8]) -> usize,
) -> PyResult<Bound<'py, PyList>> {
    let mut out: Vec<usize> = Vec::with_capacity(keys.len());
    for item in keys.iter() {
        let b = item.cast::<PyBytes>()?;
        out.push(f(b.as_bytes()));
    }
    PyList::new(py, out)
}

/// Immutable ketama ring, nginx-compatible (`hash $key consistent`).
#[pyclass(frozen, name = "Ring", module = "dispa._rust")]
pub struct PyRing {
    inner: Ring,
}

#[pymethods]
impl PyRing {
    #[new]
    #[pyo3(signature = (nodes, *, points_per_weight = DEFAULT_POINTS_PER_WEIGHT as i64))]
    fn new(nodes: Vec<(String, i64)>, points_per_weight: i64) -> PyResult<Self> {
        if points_per_weight < 1 {
            return Err(PyValueError::new_err("points_per_weight must be >= 1"));
        }
        let ppw = u32::try_from(points_per_weight)
            .map_err(|_| PyValueError::new_err("points_per_weight is too large"))?;
        let mut parsed: Vec<(String, u32)> = Vec::with_capacity(nodes.len());
        for (i, (name, weight)) in nodes.into_iter().enumerate() {
            if weight < 1 {
                return Err(PyValueError::new_err(format!(
                    "node {i} has weight {weight}; weights must be >= 1"
                )));
            }
            let w = u32::try_from(weight)
                .map_err(|_| to_py_err(RingError::TooManyPoints(weight as u64)))?;
            parsed.push((name, w));
        }
        Ring::new(&parsed, ppw)
            .map(|inner| PyRing { inner })
            .map_err(to_py_err)
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "<Ring nodes={} points={} (rust)>",
            self.inner.len(),
            self.inner.point_count()
        )
    }

    fn lookup(&self, key: &[u8]) -> usize {
        self.inner.lookup(key)
    }

    fn lookup_n(&self, key: &[u8], n: usize) -> Vec<usize> {
        self.inner.lookup_n(key, n)
    }

    fn lookup_many<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyList>,
    ) -> PyResult<Bound<'py, PyList>> {
        map_keys(py, keys, |k| self.inner.lookup(k))
    }

    fn lookup_bounded(&self, key: &[u8], loads: Vec<u64>, factor: f64) -> PyResult<usize> {
        self.inner
            .lookup_bounded(key, &loads, factor)
            .map_err(bounded_err)
    }
}
