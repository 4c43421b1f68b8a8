//! service_client
