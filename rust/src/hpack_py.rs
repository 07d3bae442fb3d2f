//! `dispa._rust.HpackEncoder` / `HpackDecoder`: the pyo3 binding of [`crate::hpack`].
//!
//! Drop-in replacements for `hpack.Encoder` / `hpack.Decoder` as `h2` uses them
//! (`H2Connection.encoder` / `.decoder`): `encode(headers, huffman=True) -> bytes`,
//! `decode(data, raw=False) -> list[tuple]`, the `header_table_size`,
//! `max_allowed_table_size` and `max_header_list_size` attributes, and errors raised as
//! the `hpack.exceptions` classes `h2` catches. Differences, none visible to `h2`: decoded
//! fields are plain tuples (a never-indexed field is an `hpack.NeverIndexedHeaderTuple`, as
//! in `hpack`); the encoder Huffman-codes a literal only when that is shorter.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use crate::hpack::{Decoder, Encoder, HpackError};
use crate::hpack_check::{Check, Kind};

fn hpack_err(py: Python<'_>, e: HpackError) -> PyErr {
    let class = match e {
        HpackError::Decoding(_) => "HPACKDecodingError",
        HpackError::InvalidIndex(_) => "InvalidTableIndex",
        HpackError::InvalidTableSize(_) => "InvalidTableSizeError",
        HpackError::OversizedHeaderList(_) => "OversizedHeaderListError",
    };
    let msg = e.to_string();
    match py.import("hpack.exceptions").and_then(|m| m.getattr(class)) {
        Ok(cls) => match cls.call1((msg.clone(),)) {
            Ok(inst) => PyErr::from_value(inst),
            Err(err) => err,
        },
        Err(_) => PyValueError::new_err(msg),
    }
}

/// `bytes` as is, `str` as UTF-8, anything else as `str(x)` (as `hpack._to_bytes`).
fn with_bytes<R>(obj: &Bound<'_, PyAny>, f: impl FnOnce(&[u8]) -> R) -> PyResult<R> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(f(b.as_bytes()));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(f(s.to_str()?.as_bytes()));
    }
    let s = obj.str()?;
    Ok(f(s.to_str()?.as_bytes()))
}

fn table_list<'py>(
    py: Python<'py>,
    table: &crate::hpack::Table,
    get: impl Fn(usize) -> Option<(Vec<u8>, Vec<u8>)>,
) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for i in 0..table.len() {
        if let Some((n, v)) = get(i) {
            list.append((PyBytes::new(py, &n), PyBytes::new(py, &v)))?;
        }
    }
    Ok(list)
}

fn dynamic_entries(table: &crate::hpack::Table, i: usize) -> Option<(Vec<u8>, Vec<u8>)> {
    table
        .get(i + 62)
        .ok()
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
}

/// HPACK encoder (`hpack.Encoder` API as `h2` uses it).
#[pyclass(name = "HpackEncoder", module = "dispa._rust")]
pub struct PyHpackEncoder {
    inner: Encoder,
}

impl PyHpackEncoder {
    fn field(&mut self, out: &mut Vec<u8>, item: &Bound<'_, PyAny>, huffman: bool) -> PyResult<()> {
        let tuple = item.cast::<PyTuple>().map_err(|_| {
            PyTypeError::new_err("a header must be a (name, value[, sensitive]) tuple")
        })?;
        let n = tuple.len();
        if n < 2 {
            return Err(PyTypeError::new_err(
                "a header must be a (name, value) tuple",
            ));
        }
        let name = tuple.get_item(0)?;
        let value = tuple.get_item(1)?;
        let mut sensitive = false;
        if !item.is_exact_instance_of::<PyTuple>() {
            // hpack.HeaderTuple / NeverIndexedHeaderTuple
            if let Ok(indexable) = item.getattr("indexable") {
                sensitive = !indexable.is_truthy()?;
            }
        }
        if n > 2 {
            sensitive = tuple.get_item(2)?.is_truthy()?;
        }
        if let (Ok(nb), Ok(vb)) = (name.cast::<PyBytes>(), value.cast::<PyBytes>()) {
            self.inner
                .encode_field(out, nb.as_bytes(), vb.as_bytes(), sensitive, huffman);
            return Ok(());
        }
        let nb = with_bytes(&name, |b| b.to_vec())?;
        with_bytes(&value, |vb| {
            self.inner.encode_field(out, &nb, vb, sensitive, huffman)
        })
    }
}

#[pymethods]
impl PyHpackEncoder {
    #[new]
    fn new() -> Self {
        PyHpackEncoder {
            inner: Encoder::new(),
        }
    }

    /// The dynamic table's maximum size; setting it owes the peer a size update.
    #[getter]
    fn get_header_table_size(&self) -> usize {
        self.inner.table().max_size()
    }

    #[setter]
    fn set_header_table_size(&mut self, value: usize) {
        self.inner.set_table_size(value);
    }

    /// Encode a header list (tuples, or a dict: pseudo-headers first) into a block.
    #[pyo3(signature = (headers, huffman = true))]
    fn encode<'py>(
        &mut self,
        py: Python<'py>,
        headers: &Bound<'py, PyAny>,
        huffman: bool,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let mut out = Vec::with_capacity(64);
        self.inner.begin_block(&mut out);
        if let Ok(d) = headers.cast::<PyDict>() {
            let mut items: Vec<Bound<'py, PyAny>> = Vec::with_capacity(d.len());
            let mut rest = Vec::new();
            for (k, v) in d.iter() {
                let pseudo = with_bytes(&k, |b| b.first() == Some(&b':'))?;
                let t = PyTuple::new(py, [k, v])?.into_any();
                if pseudo {
                    items.push(t);
                } else {
                    rest.push(t);
                }
            }
            items.extend(rest);
            for item in items {
                self.field(&mut out, &item, huffman)?;
            }
        } else if let Ok(list) = headers.cast::<PyList>() {
            for item in list.iter() {
                self.field(&mut out, &item, huffman)?;
            }
        } else {
            for item in headers.try_iter()? {
                self.field(&mut out, &item?, huffman)?;
            }
        }
        Ok(PyBytes::new(py, &out))
    }

    /// The dynamic table, newest entry first (for tests).
    fn dynamic_table<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let t = self.inner.table();
        table_list(py, t, |i| dynamic_entries(t, i))
    }
}

/// HPACK decoder (`hpack.Decoder` API as `h2` uses it).
#[pyclass(name = "HpackDecoder", module = "dispa._rust")]
pub struct PyHpackDecoder {
    inner: Decoder,
    never_indexed: Option<Py<PyAny>>, // hpack.NeverIndexedHeaderTuple, imported when needed
}

#[pymethods]
impl PyHpackDecoder {
    #[new]
    #[pyo3(signature = (max_header_list_size = crate::hpack::DEFAULT_MAX_HEADER_LIST_SIZE))]
    fn new(max_header_list_size: usize) -> Self {
        let mut inner = Decoder::new();
        inner.max_header_list_size = max_header_list_size;
        PyHpackDecoder {
            inner,
            never_indexed: None,
        }
    }

    /// The dynamic table's maximum size (as set by the peer's size updates).
    #[getter]
    fn get_header_table_size(&self) -> usize {
        self.inner.table().max_size()
    }

    #[setter]
    fn set_header_table_size(&mut self, value: usize) {
        self.inner.set_table_size(value);
    }

    /// The largest table size the peer may use (our acknowledged SETTINGS value).
    #[getter]
    fn get_max_allowed_table_size(&self) -> usize {
        self.inner.max_allowed_table_size
    }

    #[setter]
    fn set_max_allowed_table_size(&mut self, value: usize) {
        self.inner.max_allowed_table_size = value;
    }

    /// The largest decoded header list (name + value + 32 per field) of one block.
    #[getter]
    fn get_max_header_list_size(&self) -> usize {
        self.inner.max_header_list_size
    }

    #[setter]
    fn set_max_header_list_size(&mut self, value: usize) {
        self.inner.max_header_list_size = value;
    }

    /// Decode one complete header block: a list of (name, value) tuples, bytes when
    /// ``raw`` else str.
    #[pyo3(signature = (data, raw = false))]
    fn decode<'py>(
        &mut self,
        py: Python<'py>,
        data: &[u8],
        raw: bool,
    ) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        let mut failure: Option<PyErr> = None;
        let mut saw_never = false;
        let mut fields: Vec<(Bound<'py, PyAny>, Bound<'py, PyAny>, bool)> = Vec::new();
        let res = self.inner.decode_with(data, |n, v, never| {
            if failure.is_some() {
                return;
            }
            let pair = if raw {
                Ok((
                    PyBytes::new(py, n).into_any(),
                    PyBytes::new(py, v).into_any(),
                ))
            } else {
                match (std::str::from_utf8(n), std::str::from_utf8(v)) {
                    (Ok(ns), Ok(vs)) => Ok((
                        PyString::new(py, ns).into_any(),
                        PyString::new(py, vs).into_any(),
                    )),
                    _ => Err(hpack_err(
                        py,
                        HpackError::Decoding("Unable to decode headers as UTF-8"),
                    )),
                }
            };
            match pair {
                Ok((a, b)) => {
                    saw_never |= never;
                    fields.push((a, b, never));
                }
                Err(e) => failure = Some(e),
            }
        });
        if let Err(e) = res {
            return Err(hpack_err(py, e));
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if saw_never && self.never_indexed.is_none() {
            let cls = py.import("hpack")?.getattr("NeverIndexedHeaderTuple")?;
            self.never_indexed = Some(cls.unbind());
        }
        for (a, b, never) in fields {
            if never {
                let cls = self.never_indexed.as_ref().unwrap().bind(py);
                list.append(cls.call1((a, b))?)?;
            } else {
                list.append(PyTuple::new(py, [a, b])?)?;
            }
        }
        Ok(list)
    }

    /// The dynamic table, newest entry first (for tests).
    fn dynamic_table<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let t = self.inner.table();
        table_list(py, t, |i| dynamic_entries(t, i))
    }
}

/// `h2_check_headers(headers, kind) -> str | None`: why a received header list is malformed
/// (RFC 9113 §8.2/§8.3, the decisions of `h2`'s inbound validation; see
/// [`crate::hpack_check`]), or None. `kind`: 0 request, 1 response, 2 trailers.
#[pyfunction]
pub fn h2_check_headers(headers: &Bound<'_, PyAny>, kind: u8) -> PyResult<Option<&'static str>> {
    let kind = match kind {
        0 => Kind::Request,
        1 => Kind::Response,
        2 => Kind::Trailers,
        _ => return Err(PyValueError::new_err("kind must be 0, 1 or 2")),
    };
    fn pair<'py>(item: &Bound<'py, PyAny>) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let t = item
            .cast::<PyTuple>()
            .map_err(|_| PyTypeError::new_err("headers must be tuples"))?;
        if t.len() < 2 {
            return Err(PyTypeError::new_err("headers must be (name, value) tuples"));
        }
        let n = t
            .get_item(0)?
            .cast_into::<PyBytes>()
            .map_err(|_| PyTypeError::new_err("header names must be bytes"))?;
        let v = t
            .get_item(1)?
            .cast_into::<PyBytes>()
            .map_err(|_| PyTypeError::new_err("header values must be bytes"))?;
        Ok((n, v))
    }
    // keep the fields' bytes objects alive while Check borrows their contents
    let mut items: Vec<(Bound<'_, PyBytes>, Bound<'_, PyBytes>)> = Vec::new();
    if let Ok(list) = headers.cast::<PyList>() {
        items.reserve(list.len());
        for item in list.iter() {
            items.push(pair(&item)?);
        }
    } else {
        for item in headers.try_iter()? {
            items.push(pair(&item?)?);
        }
    }
    let mut c = Check::new(kind);
    for (n, v) in &items {
        if let Err(e) = c.field(n.as_bytes(), v.as_bytes()) {
            return Ok(Some(e));
        }
    }
    Ok(c.finish().err())
}
