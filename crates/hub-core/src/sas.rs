//! sas
