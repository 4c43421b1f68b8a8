//! connection_string
