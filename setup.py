"""Build the compiled parts of Dispa: one Cython extension and one Rust (pyo3) extension.

``pip install .`` compiles both. Environment switches (httptools/uvloop style):

* ``DISPA_DEBUG=1``       compile the Cython core with the DISPA_DEBUG define (resource counters)
                          and Cython line tracing; build the Rust crate in debug mode.
* ``DISPA_ANNOTATE=1``    write Cython's HTML annotation next to the sources.
* ``DISPA_NO_RUST=1``     skip the Rust crate (the pure twin of every Rust structure is used).
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("DISPA_DEBUG") == "1"

macros = [("DISPA_DEBUG", "1")] if DEBUG else []
cflags = ["-O2"] if not DEBUG else ["-O0", "-g"]

hotpath = Extension(
    "dispa._hotpath",
    sources=["_native/_hotpath.pyx"],
    include_dirs=["_native", "_native/includes"],
    define_macros=macros + ([("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []),
    extra_compile_args=cflags,
)

ext_modules = cythonize(
    [hotpath],
    compiler_directives={
        "language_level": "3",
        "embedsignature": True,
        "linetrace": DEBUG,
    },
    compile_time_env={"DISPA_DEBUG": DEBUG},
    annotate=os.environ.get("DISPA_ANNOTATE") == "1",
    include_path=["_native", "_native/includes"],
)

rust_extensions = []
if os.environ.get("DISPA_NO_RUST") != "1":
    from setuptools_rust import Binding, RustExtension

    rust_extensions.append(
        RustExtension(
            "dispa._rust",
            path="rust/Cargo.toml",
            binding=Binding.PyO3,
            debug=DEBUG,
            features=["python"],
        )
    )

setup(ext_modules=ext_modules, rust_extensions=rust_extensions, zip_safe=False)
