# HTTP/1.1 parser: C attributes of the parser and head classes.
#
# Hot path call order, per message:
#   feed() -> _append()            copy the bytes into the parser's own buffer
#   next_event() -> _next_head()   _scan_head() (limits), then _parse_request_head() /
#                                  _parse_response_head() -> _parse_fields() (syntax,
#                                  known headers, one tuple per header), one head object
#   next_event() -> body states    _next_cl() / _next_chunked() -> take_data()

cdef struct FieldInfo:
    int host
    long long content_length
    bint te
    bint chunked
    bint conn_close
    bint conn_keep
    bint conn_upgrade
    bint has_upgrade
    bint expect


cdef class RequestHead:
    cdef readonly bytes method
    cdef readonly bytes target
    cdef readonly int version
    cdef readonly list headers
    cdef readonly long long content_length
    cdef readonly bint chunked
    cdef readonly bint keep_alive
    cdef readonly bint upgrade
    cdef readonly bint expect_continue


cdef class ResponseHead:
    cdef readonly int status
    cdef readonly bytes reason
    cdef readonly int version
    cdef readonly list headers
    cdef readonly long long content_length
    cdef readonly bint chunked
    cdef readonly bint keep_alive
    cdef readonly bint upgrade


cdef class _Parser:
    cdef unsigned char* _buf
    cdef Py_ssize_t _start
    cdef Py_ssize_t _end
    cdef Py_ssize_t _cap          # 0: _buf is NULL or borrowed (see _borrowed)
    cdef object _borrowed         # the caller's bytes object _buf points into, or None
    cdef int _state
    cdef bint _is_response
    cdef bint _bare_lf
    cdef Py_ssize_t _max_head
    cdef Py_ssize_t _max_count
    cdef Py_ssize_t _max_line
    cdef Py_ssize_t _max_ext
    cdef readonly bint eof
    cdef readonly object head
    cdef readonly object trailers
    cdef object _data
    cdef object _error
    cdef long long _remaining
    cdef int _lead
    cdef bint _in_lead
    cdef Py_ssize_t _sc_line
    cdef Py_ssize_t _sc_pos
    cdef Py_ssize_t _sc_count
    cdef bint _sc_first
    cdef bint _upgrade

    cdef void _new_message(self)
    # fast paths for the compiled Session (same module): feed(), next_event(), and taking
    # Content-Length body bytes straight from the buffer
    cdef int _feed(self, object data) except -1
    cdef int _next(self) except -1
    cdef void _release_buffer(self)
    cdef void _release_if_empty(self)
    cdef Py_ssize_t _body_available(self)
    cdef void _consume_body(self, Py_ssize_t n)
    cdef int _append(self, const unsigned char* data, Py_ssize_t n) except -1
    cdef int _err(self, str message, int status) except -1
    cdef int _incomplete(self) except -1
    cdef int _te_element(self, const unsigned char* p, Py_ssize_t n, FieldInfo* info) except -1
    cdef int _next_head(self) except -1
    cdef Py_ssize_t _scan_head(self) except -2
    cdef Py_ssize_t _scan_lines(self, bint trailers) except -2
    cdef int _limit_error(self, bint trailers, bint line) except -1
    cdef Py_ssize_t _line(self, Py_ssize_t pos, Py_ssize_t* content_len) except -1
    cdef list _parse_fields(self, Py_ssize_t pos, bint head_fields, FieldInfo* info)
    cdef int _framing_checks(self, int version, FieldInfo* info) except -1
    cdef int _parse_head(self, Py_ssize_t end) except -1
    cdef int _next_chunked(self) except -1
    cdef int _decode_chunks(self, list pieces) except -1
    cdef long long _parse_chunk_size(self, const unsigned char* p, Py_ssize_t n) except -2


cdef class RequestParser(_Parser):
    cdef int _parse_head(self, Py_ssize_t end) except -1


cdef class ResponseParser(_Parser):
    cdef bytes _method
    cdef int _parse_head(self, Py_ssize_t end) except -1
