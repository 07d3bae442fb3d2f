# Structs shared by the writer and the protocol (included from dispa/_hotpath.pxd).

cdef struct Slice:
    # a borrowed (pointer, length) view of bytes owned by a Python object that outlives it
    const unsigned char* p
    Py_ssize_t n
