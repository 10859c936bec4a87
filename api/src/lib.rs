//! netfault-api: the contract shared by the agent, the CNI plugin, the CLI and
//! the tests: the fault model and its validation, the socket API's JSON
//! bodies, and a blocking client for the agent's unix socket.

pub mod action;
pub mod annotations;
pub mod client;
pub mod error;
pub mod parse;
pub mod spec;
pub mod wire;

pub use client::{Client, ClientError};
pub use error::{ErrorBody, ErrorCode, FieldError};
pub use spec::{
    Action, BackendKind, DelayAction, Direction, FaultSpec, Limits, Match, PacketAction, PortRange,
    Protocol, ProxyAction, Target,
};
pub use wire::{Counters, EnrolRequest, EnrolSource, Fault, FaultSource, PodRef, Sandbox};
