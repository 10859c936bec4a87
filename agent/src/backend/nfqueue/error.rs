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
    #[error("starting the delay thread: {0}")]
    Thread(String),
    #[error(transparent)]
    Netns(#[from] NetnsError),
}
