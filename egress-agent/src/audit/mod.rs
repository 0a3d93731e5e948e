//! The translation log: which tenant host held which egress address and
//! port, from when to when, for the audits, abuse reports and partner
//! firewalls that key on egress addresses.
//!
//! `event` is the record every part agrees on (one JSON line each);
//! `ring` turns the dataplane's creation events into records; `jsonlog`
//! writes them to a rotated file or stdout; `ipfix` exports them to a
//! collector as RFC 8158 NAT44 session events; `pipeline` fans events out
//! to the sinks and live followers and counts every one it could not
//! deliver; `lookup` answers "who was this address and port at that
//! moment" from the log files.

pub mod event;
pub mod jsonlog;
pub mod lookup;
