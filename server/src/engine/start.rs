//! Starting the engine: build the [`Agent`] from an open store, bring every stored region back
//! (`recover`), record that the agent started, and watch the holders of what came back
//! (`holders`).

use super::agent::{AGENT_ACTOR, Agent, EngineSettings, event};
use super::error::AgentError;
use crate::domain::EventKind;
use crate::kernel::probe::Features;
use crate::store::Store;
use crate::topology::{TopologyCache, TopologyReader};
use std::sync::Arc;

impl Agent {
    /// Builds the engine from an open store and probed capabilities, then recovers every stored
    /// region (see [`Agent::recover`]) and records that the agent started.
    pub async fn start(
        store: Store,
        features: Features,
        topology: TopologyReader,
        limits: EngineSettings,
    ) -> Result<Arc<Self>, AgentError> {
        let secret = store
            .meta_or_init("handoff_token_key", || {
                let mut k = vec![0u8; 32];
                rand::fill(&mut k[..]);
                k
            })
            .await?;
        let (holder_watch, holders_to_watch) = tokio::sync::mpsc::unbounded_channel();
        let agent = Arc::new(Self::new(
            store,
            features,
            TopologyCache::new(topology),
            limits,
            &secret,
            holder_watch,
        ));
        super::holders::start_watching(Arc::downgrade(&agent), holders_to_watch);
        // The AGENT_STARTED event is committed with recovery's own writes: one commit.
        let started = event(
            EventKind::AgentStarted,
            None,
            "agent started".into(),
            AGENT_ACTOR,
        );
        agent.recover(started).await?;
        // Recovered regions' holders: watched from now on (an exit while the agent was down
        // shows at once, as the pidfd of a process that is gone cannot be opened).
        for slot in agent.slots(None) {
            let live = slot.read().await;
            if let Some(h) = live.intent.holder
                && live.intent.status.has_file()
            {
                agent.watch_holder(h);
            }
        }
        Ok(agent)
    }
}
