//! The outage buffer: events taken while Redis is away, fsynced to a local
//! file, and replayed in order once it answers.

use super::*;

/// A batch waiting for the outage buffer's next write.
#[derive(Debug)]
pub(super) struct Staged {
    pub(super) events: Vec<ValidEvent>,
    pub(super) reason: String,
    pub(super) done: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

/// The outage buffer: the file and its events in order.
#[derive(Debug)]
pub(super) struct Buffer {
    /// Written on the blocking pool only ([`Buffer::on_file`]).
    pub(super) file: Arc<std::sync::Mutex<EventFile>>,
    pub(super) path: PathBuf,
    pub(super) queue: VecDeque<ValidEvent>,
}

impl Buffer {
    /// Runs `f` on the file off the async workers. Its fdatasync waits on
    /// the disk, which is slow exactly when an `appendfsync always` Redis
    /// on it is; a worker blocked on it would hold every call queued on
    /// that worker (`GetUser`, `GetItems`) as long.
    async fn on_file(
        &self,
        f: impl FnOnce(&mut EventFile) -> Result<(), LogError> + Send + 'static,
    ) -> Result<(), String> {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || f(&mut file.lock().unwrap_or_else(|p| p.into_inner())))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }
}

impl RedisStore {
    /// Replays the buffer in order, a pipeline at a time, until it is empty
    /// or Redis fails again. The lock is not held during the Redis call:
    /// `Ingest` keeps appending to the back (and answering) meanwhile, and
    /// only this task removes from the front.
    pub(super) async fn replay(&self) {
        let options = Options {
            timeout: Some(Duration::from_millis(
                self.config.command_timeout_ms.saturating_mul(20),
            )),
            ..self.options()
        };
        let mut replayed = 0usize;
        loop {
            let chunk: Vec<ValidEvent> = {
                let buffer = self.buffer.lock().await;
                let n = buffer.queue.len().min(self.config.batch.max(1));
                buffer.queue.iter().take(n).cloned().collect()
            };
            if chunk.is_empty() {
                break;
            }
            if let Err(e) = self.run_script("event", &chunk, &options).await {
                tracing::debug!(error = %e, "replay paused: redis still unreachable");
                break;
            }
            let mut buffer = self.buffer.lock().await;
            buffer.queue.drain(..chunk.len());
            replayed += chunk.len();
            self.buffered.store(buffer.queue.len(), Ordering::Release);
            metrics::counter!("recmesh_features_replayed_total").increment(chunk.len() as u64);
            metrics::gauge!("recmesh_features_buffered").set(buffer.queue.len() as f64);
            if buffer.queue.is_empty()
                && let Err(e) = buffer.on_file(EventFile::clear).await
            {
                tracing::error!(error = %e, "outage buffer replayed but the file could not be cleared; \
                    its events will be replayed again (deduplicated) at the next start");
            }
            drop(buffer);
            for e in &chunk {
                self.l1_users.invalidate(&e.user).await;
                self.l1_items.invalidate(&e.item).await;
            }
        }
        if replayed > 0 {
            tracing::info!(
                replayed,
                left = self.buffered(),
                "outage buffer replayed into redis"
            );
        }
    }

    /// Appends events to the outage buffer (durably) or refuses them.
    ///
    /// The batch is staged, and a writer task (the first batch staged
    /// since the last write starts it) writes every staged batch with one
    /// fsync once the write before it is done. On a slow disk, calls that
    /// come while a write is on the disk wait for one more fsync, not one
    /// each. The write runs in its own task, so a caller that gives up
    /// (its deadline passed) does not cut it short for the others.
    pub(super) async fn buffer(
        &self,
        events: &[ValidEvent],
        reason: &str,
    ) -> Result<Ingested, StoreError> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let first = {
            let mut staged = self.staged.lock().unwrap_or_else(|p| p.into_inner());
            staged.push(Staged {
                events: events.to_vec(),
                reason: reason.to_owned(),
                done,
            });
            staged.len() == 1
        };
        if first {
            let Some(store) = self.me.upgrade() else {
                return Err(StoreError::NotRecorded(
                    "outage buffer: the store is shutting down".into(),
                ));
            };
            tokio::spawn(async move { store.write_staged().await });
        }
        answer.await.unwrap_or_else(|_| {
            Err(StoreError::NotRecorded(
                "outage buffer: the writer stopped before the write".into(),
            ))
        })?;
        Ok(Ingested {
            buffered: events.len() as u32,
            ..Default::default()
        })
    }

    /// Writes every staged batch to the buffer file with one fsync, in the
    /// order they were staged, refusing those past `max_buffered` (a batch
    /// is taken whole or not at all).
    pub(super) async fn write_staged(&self) {
        let mut buffer = self.buffer.lock().await;
        let staged = std::mem::take(&mut *self.staged.lock().unwrap_or_else(|p| p.into_inner()));
        let mut room = self.config.max_buffered.saturating_sub(buffer.queue.len());
        let mut taken = Vec::with_capacity(staged.len());
        for s in staged {
            if s.events.len() > room {
                metrics::counter!("recmesh_features_rejected_total", "reason" => "buffer_full")
                    .increment(s.events.len() as u64);
                let _ = s.done.send(Err(StoreError::NotRecorded(format!(
                    "redis is unreachable ({}) and the outage buffer is full \
                     ({} of {} events, `redis.max_buffered`); retry later",
                    s.reason,
                    self.config.max_buffered - room,
                    self.config.max_buffered
                ))));
            } else {
                room -= s.events.len();
                taken.push(s);
            }
        }
        let Some(first) = taken.first() else { return };
        if buffer.queue.is_empty() {
            tracing::warn!(
                reason = first.reason,
                "redis unreachable: buffering events to {}",
                buffer.path.display()
            );
        }
        let batch: Vec<ValidEvent> = taken.iter().flat_map(|s| s.events.clone()).collect();
        let n = batch.len();
        let written = buffer.on_file(move |f| f.append(&batch)).await;
        self.buffer_writes.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("recmesh_features_buffer_writes_total").increment(1);
        match written {
            Ok(()) => {
                for s in &mut taken {
                    buffer.queue.extend(std::mem::take(&mut s.events));
                }
                self.buffered.store(buffer.queue.len(), Ordering::Release);
                metrics::counter!("recmesh_features_buffered_total").increment(n as u64);
                metrics::gauge!("recmesh_features_buffered").set(buffer.queue.len() as f64);
                for s in taken {
                    let _ = s.done.send(Ok(()));
                }
            }
            Err(e) => {
                for s in taken {
                    let _ = s
                        .done
                        .send(Err(StoreError::NotRecorded(format!("outage buffer: {e}"))));
                }
            }
        }
    }

    /// Writes of the outage buffer file so far, one fsync each.
    pub fn buffer_writes(&self) -> u64 {
        self.buffer_writes.load(Ordering::Relaxed)
    }

    /// Events waiting in the outage buffer.
    pub fn buffered(&self) -> usize {
        self.buffered.load(Ordering::Acquire)
    }
}
