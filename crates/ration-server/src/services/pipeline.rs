//! The `Pipeline` call's driver: reads operations off a client's stream, runs each
//! as it arrives, and sends each result back with its tag as it finishes, with a
//! bound on the operations unanswered at a time.
//!
//! Each operation runs as a Batch of one (`LedgerService::pipelined`), so
//! conversion, authorization, routing and forwarding are the Batch call's; what a
//! pipeline saves is the RPC per operation (HTTP/2 headers, a stream opened and
//! closed, the service dispatch).

use std::future::Future;

use futures_util::stream::FuturesUnordered;
use ration_proto::v1;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

/// Most operations of one Pipeline call unanswered at a time: the Batch call's
/// cap. At the bound the driver stops reading the call, so HTTP/2 flow control
/// holds the client back.
pub(super) const MAX_IN_FLIGHT: usize = ration_proto::convert::MAX_BATCH_OPS;

/// Runs every operation `incoming` yields through `handle`, at most `max_in_flight`
/// at a time, and returns the results as they finish. The results end after the
/// client closes its side and every operation is answered; a message that does not
/// decode ends them with its status; when the client goes away, reading stops and
/// operations in flight are dropped unanswered (what was proposed stays proposed,
/// as with a cancelled call: retries with the same request ids are exactly once).
///
/// One task per call reads the operations and polls them all
/// (`FuturesUnordered`): an operation is a future in that task, not a task of its
/// own (a spawn, a semaphore permit and a wake-up each, 15% of a node's samples
/// under pipelined load were tokio's scheduling).
pub(super) fn drive<S, F, Fut>(
    mut incoming: S,
    max_in_flight: usize,
    handle: F,
) -> tokio_stream::wrappers::ReceiverStream<Result<v1::PipelineResult, Status>>
where
    S: Stream<Item = Result<v1::PipelineOp, Status>> + Send + Unpin + 'static,
    F: Fn(Option<v1::BatchOp>) -> Fut + Send + 'static,
    Fut: Future<Output = v1::BatchResult> + Send + 'static,
{
    let max = max_in_flight.max(1);
    // Results waiting to be read: when the client stops reading, this fills, then
    // finished results wait in `ready`, and reading stops once `running` and
    // `ready` together reach `max`. Operations in flight are polled all the while
    // (a forwarded one's reply is read off the connection to the leader).
    let (tx, rx) = mpsc::channel(max);
    tokio::spawn(async move {
        let mut running = FuturesUnordered::new();
        let mut ready = std::collections::VecDeque::new();
        let mut reading = true;
        while reading || !running.is_empty() || !ready.is_empty() {
            tokio::select! {
                message = incoming.next(), if reading && running.len() + ready.len() < max => {
                    match message {
                        // The client closed its side: the results end once the
                        // operations in flight are answered.
                        None => reading = false,
                        Some(Err(status)) => {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                        Some(Ok(v1::PipelineOp { tag, op })) => {
                            let answered = handle(op);
                            running.push(async move { (tag, answered.await) });
                        }
                    }
                }
                Some((tag, result)) = running.next(), if !running.is_empty() => {
                    ready.push_back(v1::PipelineResult { tag, result: Some(result) });
                }
                room = tx.reserve(), if !ready.is_empty() => match (room, ready.pop_front()) {
                    (Ok(room), Some(result)) => room.send(Ok(result)),
                    _ => return,
                },
                () = tx.closed() => return,
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn op(tag: u64) -> Result<v1::PipelineOp, Status> {
        Ok(v1::PipelineOp { tag, op: None })
    }

    fn answer() -> v1::BatchResult {
        ration_proto::convert::to_proto::batch_error(&Status::not_found("x"))
    }

    /// A handler that never finishes: the driver starts `max_in_flight` operations
    /// and reads no further.
    #[tokio::test]
    async fn stops_reading_at_the_bound() {
        let started = Arc::new(AtomicUsize::new(0));
        let read = Arc::new(AtomicUsize::new(0));
        let (counted, r) = (started.clone(), read.clone());
        let incoming = tokio_stream::iter(0..10_000u64).map(move |t| {
            r.fetch_add(1, Ordering::SeqCst);
            op(t)
        });
        let _results = drive(incoming, 16, move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            std::future::pending()
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(started.load(Ordering::SeqCst), 16);
        assert_eq!(read.load(Ordering::SeqCst), 16, "nothing read past the bound");
    }

    /// A client that stops reading results: at most the bound is held, answered.
    #[tokio::test]
    async fn a_client_that_does_not_read_holds_at_most_the_bound() {
        let started = Arc::new(AtomicUsize::new(0));
        let counted = started.clone();
        let incoming = tokio_stream::iter(0..10_000u64).map(op);
        let results = drive(incoming, 16, move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            std::future::ready(answer())
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        // 16 answered and buffered, plus at most 16 more started that wait for room.
        let n = started.load(Ordering::SeqCst);
        assert!((16..=32).contains(&n), "{n} operations started");
        // Reading them all gets every tag once.
        let mut tags: Vec<u64> = results.map(|r| r.unwrap().tag).collect().await;
        tags.sort_unstable();
        assert_eq!(tags, (0..10_000).collect::<Vec<_>>());
    }

    /// While the client does not read, the operations in flight still run to
    /// their end (a forwarded one's reply is read off the leader's connection):
    /// the bound's results wait in the channel, as many again finish and wait in
    /// the task, and then nothing more is read.
    #[tokio::test]
    async fn operations_in_flight_finish_while_the_client_does_not_read() {
        let finished = Arc::new(AtomicUsize::new(0));
        let counted = finished.clone();
        let incoming = tokio_stream::iter(0..10_000u64).map(op);
        let _results = drive(incoming, 4, move |_| {
            let counted = counted.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                counted.fetch_add(1, Ordering::SeqCst);
                answer()
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(finished.load(Ordering::SeqCst), 8);
    }

    /// Results come back as operations finish, each with its tag; the results end
    /// once the client's side ended and everything is answered.
    #[tokio::test]
    async fn answers_in_finishing_order_then_ends() {
        let incoming = tokio_stream::iter([op(1), op(2), op(3)]);
        let results = drive(incoming, 8, |op: Option<v1::BatchOp>| async move {
            let _ = op;
            answer()
        });
        let tags: Vec<u64> = results.map(|r| r.unwrap().tag).collect().await;
        let mut sorted = tags.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![1, 2, 3]);

        // Slower first: the later operation is answered first.
        let slow = Arc::new(AtomicUsize::new(0));
        let incoming = tokio_stream::iter([op(10), op(11)]);
        let results = drive(incoming, 8, move |_| {
            let first = slow.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                answer()
            }
        });
        let tags: Vec<u64> = results.map(|r| r.unwrap().tag).collect().await;
        assert_eq!(tags, vec![11, 10]);
    }

    /// A message that does not decode ends the results with its status.
    #[tokio::test]
    async fn a_bad_message_ends_the_call_with_its_status() {
        let incoming = tokio_stream::iter([op(1), Err(Status::internal("bad frame")), op(2)]);
        // Operation 1 never finishes, so the first result is the error (tonic ends
        // the call at its first error).
        let mut results = drive(incoming, 8, |_| std::future::pending::<v1::BatchResult>());
        let err = results.next().await.unwrap().unwrap_err();
        assert_eq!(err.message(), "bad frame");
    }
}
