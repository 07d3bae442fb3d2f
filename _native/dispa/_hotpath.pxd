# dispa._hotpath: declarations of every cdef class of the one compilation unit.
# (Cython finds the .pxd of module "dispa._hotpath" as dispa/_hotpath.pxd on the include
# path "_native"; setup.py passes include_path=["_native", ...].)
include "consts.pxi"
include "http1_parser.pxd"
include "http1_writer.pxd"
include "protocol.pxd"
