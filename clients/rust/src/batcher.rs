//! The batcher: records in, numbered and encoded batches out. No I/O: `enqueue` feeds it
//! from the sources and hands what it prepares to the publisher.

use std::collections::BTreeMap;

use taskmill_broker::amqp::batch_properties_of;
use taskmill_protocol::{
    envelope::{encode_records, Record},
    now_ms,
};

use crate::problems::ProblemLog;

/// A batch ready to publish: (batch number, records, body, properties).
pub type Prepared = (u64, u64, Vec<u8>, lapin::BasicProperties);

/// Cuts records into batches of `size`, numbered from 0, each encoded as one message of at
/// most `max_bytes` (a batch that encodes larger is split in halves; a single record larger
/// than that is skipped and reported).
#[derive(Debug)]
pub struct Batcher {
    job: String,
    task: String,
    params: BTreeMap<String, String>,
    size: usize,
    max_bytes: usize,
    next: u64,
    pending: Vec<Record>,
    /// Headers every batch carries (`x-taskmill-eta-ms`, `x-taskmill-expires-ms`, ...).
    headers: Vec<(&'static str, i64)>,
    text_headers: Vec<(&'static str, String)>,
}

impl Batcher {
    /// A batcher for one job.
    pub fn new(
        job: &str,
        task: &str,
        params: &BTreeMap<String, String>,
        size: usize,
        max_bytes: usize,
    ) -> Self {
        Self {
            job: job.into(),
            task: task.into(),
            params: params.clone(),
            size: size.max(1),
            max_bytes,
            next: 0,
            pending: Vec::with_capacity(size.max(1)),
            headers: Vec::new(),
            text_headers: Vec::new(),
        }
    }

    /// Every batch also carries these text headers.
    pub fn with_text_headers(mut self, headers: Vec<(&'static str, String)>) -> Self {
        self.text_headers = headers;
        self
    }

    /// Every batch also carries these integer headers.
    pub fn with_headers(mut self, headers: Vec<(&'static str, i64)>) -> Self {
        self.headers = headers;
        self
    }

    /// Adds a record; a full batch is prepared into `out`.
    pub fn push(&mut self, record: Record, out: &mut Vec<Prepared>, problems: &ProblemLog) {
        self.pending.push(record);
        if self.pending.len() >= self.size {
            let full = std::mem::replace(&mut self.pending, Vec::with_capacity(self.size));
            self.prepare(full, out, problems);
        }
    }

    /// Prepares the partial batch, if any, into `out`.
    pub fn flush(&mut self, out: &mut Vec<Prepared>, problems: &ProblemLog) {
        if !self.pending.is_empty() {
            let part = std::mem::take(&mut self.pending);
            self.prepare(part, out, problems);
        }
    }

    /// Whether records wait for a full batch.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Batch numbers used so far (the next batch's number).
    pub fn numbered(&self) -> u64 {
        self.next
    }

    fn prepare(&mut self, records: Vec<Record>, out: &mut Vec<Prepared>, problems: &ProblemLog) {
        let mut stack = vec![records];
        while let Some(mut records) = stack.pop() {
            let created_ms = now_ms();
            let body = encode_records(
                &self.job,
                self.next,
                &self.task,
                &self.params,
                &records,
                created_ms,
            );
            if body.len() > self.max_bytes {
                if records.len() == 1 {
                    problems.invalid(format!(
                        "a record of {} bytes exceeds the message limit of {} bytes",
                        body.len(),
                        self.max_bytes
                    ));
                    continue;
                }
                let second = records.split_off(records.len() / 2);
                stack.push(second);
                stack.push(records);
                continue;
            }
            let mut props = batch_properties_of(&self.job, self.next, created_ms, 1);
            if !self.headers.is_empty() || !self.text_headers.is_empty() {
                use lapin::types::{AMQPValue, LongString};
                let ints = self
                    .headers
                    .iter()
                    .map(|&(k, v)| (k, AMQPValue::LongLongInt(v)));
                let texts = self
                    .text_headers
                    .iter()
                    .map(|(k, v)| (*k, AMQPValue::LongString(LongString::from(v.clone()))));
                props = taskmill_broker::amqp::with_extra_headers(&props, ints.chain(texts));
            }
            out.push((self.next, records.len() as u64, body, props));
            self.next += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use taskmill_protocol::envelope::decode;

    fn batcher(size: usize, max_bytes: usize) -> Batcher {
        Batcher::new("j", "post-stats", &BTreeMap::new(), size, max_bytes)
    }

    #[test]
    fn batches_are_numbered_and_the_rest_flushed() {
        let problems = ProblemLog::default();
        let mut b = batcher(10, 1 << 20);
        let mut out = Vec::new();
        for i in 0..25 {
            b.push(Record::from_value(&json!({"i": i})), &mut out, &problems);
        }
        assert_eq!(out.len(), 2);
        assert!(b.has_pending());
        b.flush(&mut out, &problems);
        assert!(!b.has_pending());
        let sizes: Vec<u64> = out.iter().map(|p| p.1).collect();
        assert_eq!(sizes, [10, 10, 5]);
        for (i, (n, _, body, props)) in out.iter().enumerate() {
            assert_eq!(*n, i as u64);
            let env = decode(body, usize::MAX).unwrap();
            assert_eq!((env.job.as_str(), env.batch), ("j", i as u64));
            assert_eq!(
                props.message_id().as_ref().map(|s| s.to_string()),
                Some(format!("j:{i}"))
            );
        }
        assert_eq!(b.numbered(), 3);
    }

    #[test]
    fn large_batches_split_and_huge_records_are_skipped() {
        let problems = ProblemLog::default();
        let mut b = batcher(4, 400);
        let mut out = Vec::new();
        for _ in 0..4 {
            b.push(
                Record::from_value(&json!({"body": "x".repeat(120)})),
                &mut out,
                &problems,
            );
        }
        assert!(out.len() >= 2, "{}", out.len());
        assert_eq!(out.iter().map(|p| p.1).sum::<u64>(), 4);
        assert!(out.iter().all(|p| p.2.len() <= 400));
        b.push(
            Record::from_value(&json!({"body": "y".repeat(1000)})),
            &mut out,
            &problems,
        );
        b.flush(&mut out, &problems);
        let p = problems.snapshot();
        assert_eq!(p.records_invalid, 1);
        assert!(p.samples[0].contains("exceeds the message limit"));
        // Numbers stay contiguous.
        let numbers: Vec<u64> = out.iter().map(|p| p.0).collect();
        assert_eq!(numbers, (0..out.len() as u64).collect::<Vec<_>>());
    }
}
