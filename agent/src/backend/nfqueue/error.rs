//! Why the NFQUEUE backend could not do something.

use netfault_sys::netns::NetnsError;

#[derive(Debug, thiserror::Error)]
pub enum DelayError {
    #[error("nft: {0}")]
    Nft(String),
    #[error("nf_tables netlink: {0}")]
    Netlink(String),
    #[error("NFQUEUE: {0}")]
    Queue(String),
    /// Another socket (an earlier agent's holder, during a hand-over) is
    /// bound to the queue.
    #[error("NFQUEUE: queue {0} is bound by another process (or this one lacks CAP_NET_ADMIN)")]
    QueueBusy(u16),
    #[error("starting the delay thread: {0}")]
    Thread(String),
    #[error(transparent)]
    Netns(#[from] NetnsError),
}
