//! The request path before any command runs: arbitrary bytes, delivered in arbitrary
//! chunks, through the capped line buffer and the request decoder. Properties: nothing
//! panics; the buffer yields exactly the lines a plain split on `\n` gives (a `\r` before the
//! newline removed), in order, until a line passes the cap, which it reports.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wasmcore_proto::{LineBuffer, LineError, decode_request};

const MAX: usize = 512;

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    // The reference: lines of the whole stream, each checked against the cap.
    let mut expected: Vec<Result<&[u8], ()>> = Vec::new();
    let mut rest = stream;
    while let Some(i) = rest.iter().position(|b| *b == b'\n') {
        if i > MAX {
            expected.push(Err(()));
            break;
        }
        let line = &rest[..i];
        expected.push(Ok(line.strip_suffix(b"\r").unwrap_or(line)));
        rest = &rest[i + 1..];
    }
    let tail_too_long = expected.last() != Some(&Err(())) && rest.len() > MAX;

    let mut buf = LineBuffer::new(MAX);
    let mut got: Vec<Result<Vec<u8>, ()>> = Vec::new();
    let mut chunk = usize::from(seed % 61) + 1;
    let mut fed = 0;
    'feed: while fed < stream.len() {
        let n = chunk.min(stream.len() - fed);
        buf.extend(&stream[fed..fed + n]);
        fed += n;
        chunk = chunk * 7 % 97 + 1;
        loop {
            match buf.next_line() {
                Ok(Some(line)) => {
                    let _ = decode_request(line);
                    got.push(Ok(line.to_vec()));
                }
                Ok(None) => break,
                Err(LineError::TooLong { max }) => {
                    assert_eq!(max, MAX);
                    got.push(Err(()));
                    break 'feed;
                }
            }
        }
    }
    let got_ok: Vec<Result<&[u8], ()>> = got
        .iter()
        .map(|r| r.as_ref().map(|v| v.as_slice()).map_err(|_| ()))
        .collect();
    if tail_too_long {
        // The buffer reports an overlong unterminated tail as soon as it passes the cap.
        assert_eq!(got_ok.last(), Some(&Err(())));
        assert_eq!(&got_ok[..got_ok.len() - 1], &expected[..]);
    } else {
        // A line passing the cap is reported when its newline arrives or, if it arrives in
        // pieces, as soon as the piece received passes the cap: the same place either way.
        assert_eq!(got_ok, expected);
    }
});
