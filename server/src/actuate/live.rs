//! Owns the live-session table: one session per node, the newest stream taking over from the
//! one before it, and the way down each agent's live stream. A leaf: ingest registers
//! sessions here, `crate::actuate` delivers commands through it, and it knows neither.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use guardian_proto::v1::{ServerFrame, server_frame};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::identity::NodeId;

/// One live session per node. A new stream for a node cancels the previous one and waits for
/// it to end before reading `last_stored_seq`, so the number the agent builds on already
/// includes every batch the old stream committed (no seq is handed out twice).
#[derive(Debug, Default)]
pub struct SessionTable {
    by_node: std::sync::Mutex<HashMap<NodeId, Live>>,
    generation: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct Live {
    generation: u64,
    cancel: CancellationToken,
    /// Frames to the agent on this session's stream (commands go here); set once Welcome
    /// is queued, so nothing can overtake it.
    outbound: Option<mpsc::Sender<Result<ServerFrame, Status>>>,
    /// Held by the running session for its whole life.
    running: Arc<tokio::sync::Mutex<()>>,
}

impl SessionTable {
    /// Cancels the node's current session (if any) and registers a new one.
    pub fn begin(
        &self,
        node: &NodeId,
        parent: &CancellationToken,
    ) -> (u64, CancellationToken, Arc<tokio::sync::Mutex<()>>) {
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cancel = parent.child_token();
        let mut map = self
            .by_node
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let running = match map.get(node) {
            Some(live) => {
                live.cancel.cancel();
                Arc::clone(&live.running)
            }
            None => Arc::default(),
        };
        map.insert(
            node.clone(),
            Live {
                generation,
                cancel: cancel.clone(),
                outbound: None,
                running: Arc::clone(&running),
            },
        );
        (generation, cancel, running)
    }

    /// The live stream of `node`, if it has one.
    fn outbound(&self, node: &NodeId) -> Option<mpsc::Sender<Result<ServerFrame, Status>>> {
        self.by_node
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(node)
            .and_then(|live| live.outbound.clone())
    }

    /// Opens the session's stream to commands (after its Welcome is queued).
    pub fn attach(
        &self,
        node: &NodeId,
        generation: u64,
        outbound: mpsc::Sender<Result<ServerFrame, Status>>,
    ) {
        if let Some(live) = self
            .by_node
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(node)
            .filter(|live| live.generation == generation)
        {
            live.outbound = Some(outbound);
        }
    }

    /// Forgets the node's entry if it still belongs to `generation`.
    pub fn end(&self, node: &NodeId, generation: u64) {
        let mut map = self
            .by_node
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map
            .get(node)
            .is_some_and(|live| live.generation == generation)
        {
            map.remove(node);
        }
    }
}

impl SessionTable {
    /// Whether `node` has a live stream now.
    pub fn is_live(&self, node: &NodeId) -> bool {
        self.outbound(node).is_some()
    }

    /// Sends a signed command down `node`'s live stream.
    ///
    /// # Errors
    /// A message saying why, when the node has no live stream or it just closed.
    pub(super) async fn send_command(
        &self,
        node: &NodeId,
        command: guardian_proto::v1::Command,
    ) -> Result<(), String> {
        let outbound = self
            .outbound(node)
            .ok_or_else(|| format!("node {node} has no live stream"))?;
        let frame = ServerFrame {
            frame: Some(server_frame::Frame::Command(command)),
        };
        tokio::time::timeout(Duration::from_secs(5), outbound.send(Ok(frame)))
            .await
            .map_err(|_| format!("node {node}'s stream did not take the command within 5 s"))?
            .map_err(|_| format!("node {node}'s stream closed"))
    }
}
