//! HTTP/1.x request/response matcher (being written).
