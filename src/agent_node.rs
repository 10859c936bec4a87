//! A node whose CNI chain enrols its pods with a private netfaultd: what the
//! tests, the benches and the demo all start from.

use std::collections::BTreeMap;

use crate::agent::Agent;
use crate::error::Result;
use crate::node::{Node, NodeOptions, Pod};
use crate::tmp::TempDir;

/// A running [`Agent`] in a temp dir and a [`Node`] whose netfault entry
/// talks to its socket. Dropping it removes the node (and with it the host
/// ends of the pods' veths), then stops the agent, then removes its dir.
#[derive(Debug)]
pub struct AgentNode {
    // Field order is drop order.
    pub node: Node,
    pub agent: Agent,
    pub dir: TempDir,
}

impl AgentNode {
    /// Starts netfaultd in a fresh `/tmp/PREFIX-UNIQUE` and builds a node
    /// from `opts` (its `socket` replaced by the agent's).
    pub fn start(prefix: &str, opts: NodeOptions) -> Result<AgentNode> {
        AgentNode::start_in(TempDir::new(prefix)?, opts)
    }

    /// [`AgentNode::start`] in a dir the caller made (and may have shown).
    pub fn start_in(dir: TempDir, opts: NodeOptions) -> Result<AgentNode> {
        AgentNode::start_in_with_args(dir, opts, &[])
    }

    /// [`AgentNode::start_in`] with extra netfaultd arguments (see
    /// [`Agent::start_with_args`]).
    pub fn start_in_with_args(
        dir: TempDir,
        opts: NodeOptions,
        agent_args: &[&str],
    ) -> Result<AgentNode> {
        let agent = Agent::start_with_args(dir.path(), agent_args)?;
        let node = Node::new(NodeOptions {
            socket: agent.socket(),
            ..opts
        })?;
        Ok(AgentNode { node, agent, dir })
    }

    /// CNI ADD of a pod without annotations.
    pub fn add_pod(&self, name: &str) -> Result<Pod> {
        self.node.add_pod(name, &BTreeMap::new())
    }
}
