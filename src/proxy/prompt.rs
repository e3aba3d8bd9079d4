//! What a request's body will cost in tokens, reckoned before it is sent: its prompt from the
//! size of the text it carries, and the completion its client allowed.
//!
//! The estimate is raw on purpose: text bytes over `BYTES_PER_TOKEN`, plus a few tokens for
//! each message. The limiter learns per model the factor between this and what the upstream
//! counts (`limiter::Calibration`), so the estimate need not know the model's tokenizer; it
//! must only be proportional to it. Images, audio and files are counted at a flat
//! `ATTACHMENT_TOKENS` each rather than by the size of their base64 text.
//!
//! A body that is not JSON, or names no prompt the estimate knows, is counted by its size at
//! `FALLBACK_BYTES_PER_TOKEN` (fewer bytes per token, so more tokens: on the safe side); a body
//! not in hand, by its declared length or the held-body limit, as a guess the limiter never
//! refuses as too large.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use crate::limiter::TokenAsk;

/// Bytes of English text or code per token, for the tokenizers of today's open models (Llama 3,
/// Mistral, Qwen: 3.5 to 4.5 on prose, fewer on code); calibration takes up the difference.
pub const BYTES_PER_TOKEN: f64 = 4.0;

/// Bytes per token for a body that is not read as a prompt: fewer than `BYTES_PER_TOKEN`, so
/// the estimate errs on the high side.
pub const FALLBACK_BYTES_PER_TOKEN: f64 = 3.0;

/// Tokens of each message's framing (role, separators), as chat templates add them.
const TOKENS_PER_MESSAGE: u64 = 4;

/// Tokens counted for one image, audio clip or file.
pub const ATTACHMENT_TOKENS: u64 = 1024;

/// Keys whose value is an attachment, not text.
const ATTACHMENT_KEYS: &[&str] = &[
    "image_url",
    "image",
    "input_audio",
    "audio",
    "file",
    "source",
];

/// The fields the sidecar reads from a JSON request body: which model, whether it streams,
/// and what it costs. Decoded once per request (see `intake`).
#[derive(Debug, Default, Deserialize)]
pub struct BodyFields {
    pub model: Option<String>,
    pub stream: Option<bool>,
    messages: Option<Text>,
    prompt: Option<Text>,
    input: Option<Text>,
    system: Option<Text>,
    instructions: Option<Text>,
    tools: Option<Text>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
}

impl BodyFields {
    /// What a body with these fields asks: `len` is the body's size, for a body that names no
    /// prompt.
    pub fn ask(&self, len: usize) -> TokenAsk {
        let parts = [
            &self.messages,
            &self.prompt,
            &self.input,
            &self.system,
            &self.instructions,
            &self.tools,
        ];
        let text = parts
            .iter()
            .filter_map(|p| p.as_ref())
            .fold(Text::default(), |mut sum, t| {
                sum.add(t);
                sum
            });
        let prompt = if text.is_empty() {
            by_size(len)
        } else {
            text.tokens()
        };
        let completion = self
            .max_completion_tokens
            .or(self.max_tokens)
            .or(self.max_output_tokens)
            .map(clamp);
        TokenAsk {
            prompt: clamp(prompt),
            completion,
            known: true,
        }
    }
}

/// What a body that could not be read as JSON asks: its size, on the safe side.
pub fn ask_of_unread(len: usize) -> TokenAsk {
    TokenAsk {
        prompt: clamp(by_size(len)),
        completion: None,
        known: true,
    }
}

/// What a body not in hand may ask: its declared length, or else `limit` (the held-body
/// limit), as a guess.
pub fn ask_of_streamed(declared: Option<u64>, limit: usize) -> TokenAsk {
    let len = declared.map_or(limit, |d| usize::try_from(d).unwrap_or(usize::MAX));
    TokenAsk {
        prompt: clamp(by_size(len)),
        completion: None,
        known: false,
    }
}

fn by_size(len: usize) -> u64 {
    (len as f64 / FALLBACK_BYTES_PER_TOKEN).ceil() as u64
}

fn clamp(tokens: u64) -> u32 {
    u32::try_from(tokens).unwrap_or(u32::MAX)
}

/// The text in a JSON value, measured without keeping it: bytes of its strings, the objects
/// it holds (each a message or a part of one), and its attachments.
#[derive(Debug, Default, Clone, Copy)]
struct Text {
    bytes: u64,
    objects: u64,
    attachments: u64,
}

impl Text {
    fn add(&mut self, other: &Text) {
        self.bytes += other.bytes;
        self.objects += other.objects;
        self.attachments += other.attachments;
    }

    fn is_empty(&self) -> bool {
        self.bytes == 0 && self.objects == 0 && self.attachments == 0
    }

    fn tokens(&self) -> u64 {
        (self.bytes as f64 / BYTES_PER_TOKEN).ceil() as u64
            + self.objects * TOKENS_PER_MESSAGE
            + self.attachments * ATTACHMENT_TOKENS
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Text, D::Error> {
        deserializer.deserialize_any(TextVisitor)
    }
}

struct TextVisitor;

impl<'de> Visitor<'de> for TextVisitor {
    type Value = Text;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
        Ok(Text {
            bytes: v.len() as u64,
            ..Text::default()
        })
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Text, E> {
        Ok(Text::default())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Text, E> {
        Ok(Text::default())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Text, E> {
        Ok(Text::default())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Text, E> {
        Ok(Text::default())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Text, E> {
        Ok(Text::default())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text, A::Error> {
        let mut sum = Text::default();
        while let Some(t) = seq.next_element::<Text>()? {
            sum.add(&t);
        }
        Ok(sum)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Text, A::Error> {
        let mut sum = Text {
            objects: 1,
            ..Text::default()
        };
        while let Some(key) = map.next_key::<Key>()? {
            if key.attachment {
                map.next_value::<IgnoredAny>()?;
                sum.attachments += 1;
            } else {
                sum.add(&map.next_value::<Text>()?);
            }
        }
        Ok(sum)
    }
}

/// An object key, read only as far as whether it names an attachment.
struct Key {
    attachment: bool,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Key, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key {
                    attachment: ATTACHMENT_KEYS.contains(&v),
                })
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(body: &str) -> TokenAsk {
        let fields: BodyFields = serde_json::from_str(body).unwrap();
        fields.ask(body.len())
    }

    #[test]
    fn a_chat_prompt_is_its_text_over_four_and_a_few_per_message() {
        let text = "x".repeat(4_000);
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"system","content":"be brief"}},{{"role":"user","content":"{text}"}}],"max_tokens":200}}"#
        );
        let a = ask(&body);
        // 4000 + "system" + "be brief" + "user" + 2 roles: 1000 + 5 tokens of text, 2 messages.
        assert_eq!(a.prompt, 1_005 + 2 * 4);
        assert_eq!(a.completion, Some(200));
        assert!(a.known);
    }

    #[test]
    fn parts_images_and_other_apis_are_counted() {
        let image = "A".repeat(1_000_000);
        let body = format!(
            r#"{{"messages":[{{"role":"user","content":[{{"type":"text","text":"what is this?"}},{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{image}"}}}}]}}],"max_completion_tokens":7}}"#
        );
        let a = ask(&body);
        assert!(a.prompt < 1_200, "the image is not counted as text: {a:?}");
        assert!(a.prompt >= 1_024, "{a:?}");
        assert_eq!(a.completion, Some(7));
        assert_eq!(ask(r#"{"prompt":"abcdefgh"}"#).prompt, 2);
        assert_eq!(ask(r#"{"input":["abcd","efgh"]}"#).prompt, 2);
        let anthropic = ask(
            r#"{"system":"abcd","messages":[{"role":"user","content":"abcd"}],"max_tokens":5}"#,
        );
        assert_eq!(anthropic.prompt, 3 + 4);
    }

    #[test]
    fn a_body_without_a_prompt_or_not_json_is_counted_by_size_never_zero() {
        let a = ask(r#"{"model":"m","foo":"bar"}"#);
        assert_eq!(a.prompt, 9, "25 bytes over 3");
        assert_eq!(a.completion, None);
        let unread = ask_of_unread(3_000);
        assert_eq!(unread.prompt, 1_000);
        assert!(unread.known);
        let streamed = ask_of_streamed(None, 8 << 20);
        assert!(!streamed.known);
        assert!(streamed.prompt > 0);
        assert_eq!(ask_of_streamed(Some(300), 8 << 20).prompt, 100);
        assert_eq!(ask_of_unread(0).prompt, 0);
    }

    #[test]
    fn hostile_values_do_not_panic() {
        for body in [
            r#"{"messages":"just a string"}"#,
            r#"{"messages":[[[[[]]]]]}"#,
            r#"{"max_tokens":18446744073709551615,"prompt":""}"#,
            r#"{"messages":[{"content":null}],"max_tokens":0}"#,
        ] {
            let _ = ask(body);
        }
        assert!(serde_json::from_str::<BodyFields>(r#"{"max_tokens":-1}"#).is_err());
        assert_eq!(
            ask(r#"{"max_tokens":18446744073709551615,"prompt":"a"}"#).completion,
            Some(u32::MAX)
        );
    }
}
