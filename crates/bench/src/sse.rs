//! Server-sent events: an incremental parser that takes bytes as they arrive, split anywhere, and the reading of
//! OpenAI streaming chunks.

use serde_json::Value;

/// The longest SSE line accepted (a chunk with a very long text delta, or a server gone wrong).
pub const SSE_LINE_MAX: usize = 16 << 20;

/// One dispatched event: its `event:` name, if any, and its `data:` lines joined with `\n`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

/// Parses the `text/event-stream` format (the WHATWG HTML spec, section 9.2): lines end in LF, CRLF or CR; an empty
/// line dispatches the event; `:` starts a comment; one space after the field's colon is dropped; `id` and `retry`
/// are ignored. An event without data is not dispatched.
#[derive(Default)]
pub struct SseParser {
    line: Vec<u8>,
    /// The previous byte was a CR, so an LF that follows it ends nothing.
    after_cr: bool,
    event: Option<String>,
    data: Option<String>,
}

impl SseParser {
    /// Feeds bytes; appends every event they complete to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), String> {
        for &byte in bytes {
            let after_cr = std::mem::replace(&mut self.after_cr, byte == b'\r');
            match byte {
                b'\n' if after_cr => {}
                b'\n' | b'\r' => self.end_line(out),
                _ => {
                    if self.line.len() >= SSE_LINE_MAX {
                        return Err(format!("an SSE line is longer than {SSE_LINE_MAX} bytes"));
                    }
                    self.line.push(byte);
                }
            }
        }
        Ok(())
    }

    /// True when no partial line or undispatched event is buffered, i.e. the stream ended cleanly.
    pub fn is_idle(&self) -> bool {
        self.line.is_empty() && self.data.is_none()
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                out.push(SseEvent {
                    event: self.event.take(),
                    data,
                });
            }
            self.event = None;
            return;
        }
        let line = String::from_utf8_lossy(&line);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (&*line, ""),
        };
        match field {
            "" => {} // a comment
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            "event" => self.event = Some(value.to_string()),
            _ => {}
        }
    }
}

/// What one SSE event of an OpenAI stream says.
#[derive(Clone, Debug, PartialEq)]
pub enum Chunk {
    /// `data: [DONE]`.
    Done,
    Data {
        /// The first choice carries text (`text`, `delta.content` or `delta.reasoning_content`, non-empty).
        has_text: bool,
        /// The chunk has choices at all (the final usage-only chunk has none).
        has_choices: bool,
        /// `usage.completion_tokens`: the running count with `continuous_usage_stats`, else the total at the end.
        completion_tokens: Option<u64>,
        prompt_tokens: Option<u64>,
    },
    /// An `error` event or a chunk with an `error` object: the server's message.
    Error(String),
}

/// Reads one event. Data that is not JSON is an error chunk quoting it.
pub fn parse_chunk(event: &SseEvent) -> Chunk {
    let data = event.data.trim();
    if data == "[DONE]" {
        return Chunk::Done;
    }
    let value: Value = match serde_json::from_str(data) {
        Ok(value) => value,
        Err(e) => return Chunk::Error(format!("undecodable chunk ({e}): {}", truncate(data, 300))),
    };
    if let Some(error) = value.get("error").filter(|e| !e.is_null()) {
        let message = error.get("message").and_then(Value::as_str).map(str::to_string);
        return Chunk::Error(message.unwrap_or_else(|| error.to_string()));
    }
    if event.event.as_deref() == Some("error") {
        return Chunk::Error(truncate(data, 1000));
    }
    let choice = value.get("choices").and_then(|c| c.get(0));
    let non_empty = |v: Option<&Value>| v.and_then(Value::as_str).is_some_and(|s| !s.is_empty());
    let has_text = choice.is_some_and(|c| {
        non_empty(c.get("text"))
            || c.get("delta")
                .is_some_and(|d| non_empty(d.get("content")) || non_empty(d.get("reasoning_content")))
    });
    let usage = value.get("usage").filter(|u| !u.is_null());
    Chunk::Data {
        has_text,
        has_choices: choice.is_some(),
        completion_tokens: usage.and_then(|u| u.get("completion_tokens")).and_then(Value::as_u64),
        prompt_tokens: usage.and_then(|u| u.get("prompt_tokens")).and_then(Value::as_u64),
    }
}

pub(crate) fn truncate(text: &str, chars_max: usize) -> String {
    match text.char_indices().nth(chars_max) {
        Some((end, _)) => format!("{}... ({} bytes in all)", &text[..end], text.len()),
        None => text.to_string(),
    }
}

/// Turns the chunks of one streamed response into token times.
///
/// Tokens are counted, not events. When a chunk with choices carries `usage.completion_tokens` (vLLM's
/// `continuous_usage_stats`), the increase over the tokens counted so far is the number of tokens it brought;
/// otherwise a chunk with non-empty text brings one token. A chunk that brings k tokens at time t adds one gap
/// (t minus the previous token's time; for the first token, t minus the send time is the TTFT) followed by k-1 zero
/// gaps: the client really did see k tokens at once, and this keeps the gaps summing to e2e minus TTFT with one gap
/// per token after the first, so their mean equals TPOT. A usage-only chunk (no choices) brings no gap; its total
/// only corrects the output token count.
#[derive(Debug, Default)]
pub struct TokenTimes {
    /// Seconds from the send to the first token.
    pub ttft_s: Option<f64>,
    /// Gaps between consecutive tokens, seconds.
    pub itl_s: Vec<f64>,
    /// Tokens counted from chunks with choices.
    pub n_counted: u64,
    /// The last `usage.completion_tokens` seen.
    pub usage_completion_tokens: Option<u64>,
    pub usage_prompt_tokens: Option<u64>,
    last_s: f64,
}

impl TokenTimes {
    /// Records a data chunk that arrived `at_s` seconds after the send.
    pub fn on_data(&mut self, at_s: f64, has_text: bool, has_choices: bool, completion_tokens: Option<u64>) {
        if let Some(total) = completion_tokens {
            self.usage_completion_tokens = Some(total);
        }
        let k = match (has_choices, completion_tokens) {
            (false, _) => 0,
            (true, Some(total)) => total.saturating_sub(self.n_counted),
            (true, None) => u64::from(has_text),
        };
        if k == 0 {
            return;
        }
        match self.ttft_s {
            None => self.ttft_s = Some(at_s),
            Some(_) => self.itl_s.push(at_s - self.last_s),
        }
        self.itl_s.extend(std::iter::repeat_n(0.0, (k - 1) as usize));
        self.n_counted += k;
        self.last_s = at_s;
    }

    /// Output tokens: the server's final count where it gave one, else the count from chunks.
    pub fn n_output(&self) -> u64 {
        self.n_counted.max(self.usage_completion_tokens.unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(pieces: &[&[u8]]) -> Vec<SseEvent> {
        let mut parser = SseParser::default();
        let mut out = Vec::new();
        for piece in pieces {
            parser.push(piece, &mut out).unwrap();
        }
        assert!(parser.is_idle());
        out
    }

    fn event(data: &str) -> SseEvent {
        SseEvent {
            event: None,
            data: data.into(),
        }
    }

    const STREAM: &str = ": keep-alive\r\n\r\ndata: {\"a\":1}\r\n\r\ndata:{\"b\":2}\n\nevent: error\ndata: line1\n\
                          data: line2\nid: 7\n\ndata: [DONE]\r\r";

    #[test]
    fn events_survive_any_split() {
        let want = vec![
            event("{\"a\":1}"),
            event("{\"b\":2}"),
            SseEvent {
                event: Some("error".into()),
                data: "line1\nline2".into(),
            },
            event("[DONE]"),
        ];
        let bytes = STREAM.as_bytes();
        assert_eq!(parse_all(&[bytes]), want);
        for split in 0..=bytes.len() {
            assert_eq!(parse_all(&[&bytes[..split], &bytes[split..]]), want, "split at {split}");
        }
        for a in 0..bytes.len() {
            for b in a..bytes.len() {
                assert_eq!(
                    parse_all(&[&bytes[..a], &bytes[a..b], &bytes[b..]]),
                    want,
                    "split at {a}, {b}"
                );
            }
        }
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(parse_all(&singles), want);
    }

    #[test]
    fn an_unterminated_event_is_not_idle_and_long_lines_are_refused() {
        let mut parser = SseParser::default();
        let mut out = Vec::new();
        parser.push(b"data: {\"x\":1}\n", &mut out).unwrap();
        assert!(out.is_empty() && !parser.is_idle());
        let long = vec![b'a'; SSE_LINE_MAX + 1];
        assert!(
            SseParser::default()
                .push(&long, &mut out)
                .unwrap_err()
                .contains("longer than")
        );
    }

    #[test]
    fn chunks_are_read_for_text_usage_done_and_errors() {
        let data = |has_text, has_choices, completion_tokens, prompt_tokens| Chunk::Data {
            has_text,
            has_choices,
            completion_tokens,
            prompt_tokens,
        };
        let cases = [
            ("[DONE]", Chunk::Done),
            (r#"{"choices":[{"text":"hi"}]}"#, data(true, true, None, None)),
            (
                r#"{"choices":[{"text":""}],"usage":null}"#,
                data(false, true, None, None),
            ),
            (
                r#"{"choices":[{"delta":{"role":"assistant"}}]}"#,
                data(false, true, None, None),
            ),
            (
                r#"{"choices":[{"delta":{"content":"x"}}]}"#,
                data(true, true, None, None),
            ),
            (
                r#"{"choices":[{"delta":{"reasoning_content":"x"}}]}"#,
                data(true, true, None, None),
            ),
            (
                r#"{"choices":[{"text":"ab"}],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#,
                data(true, true, Some(2), Some(5)),
            ),
            (
                r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9}}"#,
                data(false, false, Some(9), Some(5)),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse_chunk(&event(text)), want, "{text}");
        }
        let errors = [
            (event(r#"{"error":{"message":"boom","type":"x"}}"#), "boom"),
            (event(r#"{"error":"plain"}"#), "\"plain\""),
            (
                SseEvent {
                    event: Some("error".into()),
                    data: "{\"detail\":\"bad\"}".into(),
                },
                "detail",
            ),
            (event("not json"), "undecodable chunk"),
        ];
        for (event, want) in errors {
            match parse_chunk(&event) {
                Chunk::Error(message) => assert!(message.contains(want), "{message:?} lacks {want:?}"),
                other => panic!("{event:?} read as {other:?}"),
            }
        }
    }

    #[test]
    fn continuous_usage_counts_tokens_and_spreads_none() {
        let mut t = TokenTimes::default();
        t.on_data(0.001, false, true, Some(0)); // role-only first chunk
        t.on_data(0.100, true, true, Some(1));
        t.on_data(0.150, true, true, Some(4)); // three tokens in one chunk
        t.on_data(0.160, false, true, Some(4)); // empty text, nothing new
        t.on_data(0.200, true, true, Some(5));
        t.on_data(0.210, false, false, Some(5)); // final usage-only chunk
        assert_eq!(t.ttft_s, Some(0.100));
        let itl: Vec<f64> = t.itl_s.iter().map(|g| (g * 1e6).round() / 1e6).collect();
        assert_eq!(itl, vec![0.05, 0.0, 0.0, 0.05]);
        assert_eq!(t.n_output(), 5);
        assert!((t.ttft_s.unwrap() + t.itl_s.iter().sum::<f64>() - 0.2).abs() < 1e-12);
    }

    #[test]
    fn without_usage_each_text_chunk_is_one_token() {
        let mut t = TokenTimes::default();
        t.on_data(0.5, true, true, None);
        t.on_data(0.6, false, true, None);
        t.on_data(0.7, true, true, None);
        assert_eq!((t.ttft_s, t.n_counted), (Some(0.5), 2));
        // A final total larger than what was counted corrects the count but invents no gaps.
        t.on_data(0.8, false, false, Some(4));
        assert_eq!((t.n_output(), t.itl_s.len()), (4, 1));
        // A first chunk of several tokens: TTFT, then zero gaps.
        let mut t = TokenTimes::default();
        t.on_data(0.3, true, true, Some(3));
        assert_eq!((t.ttft_s, t.itl_s.clone()), (Some(0.3), vec![0.0, 0.0]));
    }
}
