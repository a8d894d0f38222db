//! `mmrun bench`: training and generation throughput on the reference shape. (Filled in below.)
