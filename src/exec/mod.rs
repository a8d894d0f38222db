//! Executing a plan: lock each stale stage's key, run it, publish its artifact, record the run.
