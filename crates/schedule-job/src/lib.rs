//! schedule-job
