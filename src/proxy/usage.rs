//! What the upstream counted for a request, read from its answer as it streams through: the
//! `usage` object of a JSON body, or of the server-sent events of a stream, in OpenAI's form
//! (`prompt_tokens`, `completion_tokens`) or Anthropic's (`input_tokens`, `output_tokens`, and
//! the cache counts, which count as input).
//!
//! The answer is not held: each chunk is searched for `"usage":` as it passes, with the last
//! few hundred bytes of the chunk before kept so that an object split between two chunks is
//! still found. The last value seen of each field wins, since a stream reports its usage at its
//! end (OpenAI's last chunk; Anthropic's `message_delta` after its `message_start`), and
//! OpenAI's stream carries `"usage":null` in every chunk before that.

use memchr::memmem;
use serde::Deserialize;

use crate::limiter::Usage;

/// Bytes kept from one chunk for the next: more than any usage object.
const CARRY: usize = 1024;

/// The fields of a `usage` object, in either form.
#[derive(Debug, Default, Deserialize)]
struct UsageFields {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

/// Reads `usage` out of an answer's body, chunk by chunk.
#[derive(Debug, Default)]
pub struct UsageReader {
    carry: Vec<u8>,
    prompt: Option<u64>,
    completion: Option<u64>,
}

impl UsageReader {
    /// Looks at the next chunk of the answer. The carry is one buffer, reused: nothing is
    /// allocated per chunk once it has grown to `2 * CARRY`.
    pub fn feed(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        // What straddles the last chunk and this one: the carry and this chunk's start.
        let head = chunk.len().min(CARRY);
        let mut joined = std::mem::take(&mut self.carry);
        joined.extend_from_slice(&chunk[..head]);
        self.scan(&joined);
        if chunk.len() > head {
            self.scan(chunk);
        }
        // The next carry: the last `CARRY` bytes of all that was seen.
        if chunk.len() >= CARRY {
            joined.clear();
            joined.extend_from_slice(&chunk[chunk.len() - CARRY..]);
        } else {
            let excess = joined.len().saturating_sub(CARRY);
            joined.drain(..excess);
        }
        self.carry = joined;
    }

    fn scan(&mut self, text: &[u8]) {
        for at in memmem::find_iter(text, b"\"usage\"") {
            // Inside a JSON string the quotes would be escaped.
            if at > 0 && text[at - 1] == b'\\' {
                continue;
            }
            let rest = &text[at + b"\"usage\"".len()..];
            let Some(colon) = rest.iter().position(|b| !b.is_ascii_whitespace()) else {
                continue;
            };
            if rest[colon] != b':' {
                continue;
            }
            let value = &rest[colon + 1..];
            let mut values = serde_json::Deserializer::from_slice(value).into_iter::<UsageFields>();
            if let Some(Ok(fields)) = values.next() {
                self.take(fields);
            }
        }
    }

    fn take(&mut self, f: UsageFields) {
        let cached = f
            .cache_creation_input_tokens
            .unwrap_or(0)
            .saturating_add(f.cache_read_input_tokens.unwrap_or(0));
        let prompt = f
            .prompt_tokens
            .or(f.input_tokens)
            .map(|p| p.saturating_add(cached));
        if let Some(p) = prompt {
            self.prompt = Some(p);
        }
        if let Some(c) = f.completion_tokens.or(f.output_tokens) {
            self.completion = Some(c);
        }
    }

    /// What the upstream counted, if the answer said.
    pub fn usage(&self) -> Option<Usage> {
        if self.prompt.is_none() && self.completion.is_none() {
            return None;
        }
        Some(Usage {
            prompt: self.prompt.unwrap_or(0),
            completion: self.completion.unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(chunks: &[&[u8]]) -> Option<Usage> {
        let mut r = UsageReader::default();
        for c in chunks {
            r.feed(c);
        }
        r.usage()
    }

    fn usage(prompt: u64, completion: u64) -> Option<Usage> {
        Some(Usage { prompt, completion })
    }

    #[test]
    fn a_json_answer_in_any_field_order() {
        let end = br#"{"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#;
        assert_eq!(read(&[end]), usage(12, 3));
        let first = br#"{"usage": {"completion_tokens": 3, "prompt_tokens": 12}, "choices": []}"#;
        assert_eq!(read(&[first]), usage(12, 3));
        assert_eq!(read(&[br#"{"choices":[]}"#]), None);
    }

    #[test]
    fn an_object_split_across_chunks_is_found_once() {
        let body = br#"{"choices":[],"usage":{"prompt_tokens":1200,"completion_tokens":34}}"#;
        for split in 1..body.len() {
            let (a, b) = body.split_at(split);
            assert_eq!(read(&[a, b]), usage(1200, 34), "split at {split}");
        }
    }

    #[test]
    fn an_object_dripped_a_few_bytes_at_a_time_is_found() {
        let body = br#"data: {"choices":[],"usage":{"prompt_tokens":777,"completion_tokens":5}}"#;
        for size in [1, 3, 7, 64] {
            let chunks: Vec<&[u8]> = body.chunks(size).collect();
            assert_eq!(read(&chunks), usage(777, 5), "chunks of {size}");
        }
        let mut long = vec![b' '; 5_000];
        long.extend_from_slice(body);
        long.extend_from_slice(&[b' '; 3_000]);
        for size in [1_000, 1_024, 1_500, 4_096] {
            let chunks: Vec<&[u8]> = long.chunks(size).collect();
            assert_eq!(read(&chunks), usage(777, 5), "chunks of {size}");
        }
    }

    #[test]
    fn the_last_chunk_of_an_openai_stream() {
        let stream: &[&[u8]] = &[
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n",
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":50,\"completion_tokens\":7}}\n\n",
            b"data: [DONE]\n\n",
        ];
        assert_eq!(read(stream), usage(50, 7));
    }

    #[test]
    fn an_anthropic_stream_and_its_cache_counts() {
        let stream: &[&[u8]] = &[
            b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":100,\"cache_read_input_tokens\":20,\"output_tokens\":1}}}\n\n",
            b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":42}}\n\n",
        ];
        assert_eq!(read(stream), usage(120, 42));
    }

    #[test]
    fn text_that_talks_about_usage_is_not_usage() {
        let body = br#"{"choices":[{"message":{"content":"the \"usage\": {\"prompt_tokens\": 9} field"}}]}"#;
        assert_eq!(read(&[body]), None);
        let hostile = br#"{"usage":{"prompt_tokens":-1,"completion_tokens":"x"}}"#;
        assert_eq!(read(&[hostile]), None);
        let huge =
            br#"{"usage":{"prompt_tokens":18446744073709551615,"cache_read_input_tokens":5}}"#;
        assert_eq!(read(&[huge]), usage(u64::MAX, 0));
    }
}
