//! `dispa._rust.Maglev`: the pyo3 binding of [`crate::maglev::Maglev`].
//!
//! Same rules as `py_ring`: plain data across (`str`/`int` nodes, `bytes` keys, `list[int]`
//! loads in; `int`/`list[int]` out), no Python references held, the GIL kept for lookups,
//! errors become `ValueError` here and only here. Docstrings live in `dispa/_rust.pyi`.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::maglev::{Maglev, MaglevError, DEFAULT_TABLE_SIZE};
use crate::py_ring::{bounded_err, map_keys};

fn to_py_err(e: MaglevError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Immutable Maglev lookup table.
#[pyclass(frozen, name = "Maglev", module = "dispa._rust")]
pub struct PyMaglev {
    inner: Maglev,
}

#[pymethods]
impl PyMaglev {
    #[new]
    #[pyo3(signature = (nodes, *, table_size = DEFAULT_TABLE_SIZE as i64))]
    fn new(nodes: Vec<(String, i64)>, table_size: i64) -> PyResult<Self> {
        if table_size < 0 {
            return Err(PyValueError::new_err(format!(
                "table_size {table_size} is not a prime"
            )));
        }
        let m = u32::try_from(table_size)
            .map_err(|_| to_py_err(MaglevError::TooLarge(table_size as u64)))?;
        let mut parsed: Vec<(String, u32)> = Vec::with_capacity(nodes.len());
        for (i, (name, weight)) in nodes.into_iter().enumerate() {
            if weight < 1 {
                return Err(PyValueError::new_err(format!(
                    "node {i} has weight {weight}; weights must be >= 1"
                )));
            }
            let w = u32::try_from(weight).map_err(|_| {
                PyValueError::new_err(format!(
                    "node {i} has weight {weight}; the limit is {}",
                    u32::MAX
                ))
            })?;
            parsed.push((name, w));
        }
        Maglev::new(&parsed, m)
            .map(|inner| PyMaglev { inner })
            .map_err(to_py_err)
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "<Maglev nodes={} table_size={} (rust)>",
            self.inner.len(),
            self.inner.table_size()
        )
    }

    #[getter]
    fn table_size(&self) -> usize {
        self.inner.table_size()
    }

    fn slot_counts(&self) -> Vec<usize> {
        self.inner.slot_counts()
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
