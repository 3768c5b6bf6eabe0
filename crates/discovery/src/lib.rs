//! Worker discovery through etcd.
