//! `earshot verify`: checks the residency receipts of finals, offline,
//! against the deployment's CA and topology (the checks themselves are
//! `earshot_common::receipt`).
//!
//! Input is JSON lines of server messages, as `earshot listen` prints
//! them: a `session` message sets the jurisdiction its session's finals are
//! checked against (unless `--jurisdiction` names one for every final);
//! other messages are skipped. A line that is not a server message is a
//! failure, not a skip: a file whose finals cannot be read proves nothing.

use std::io::BufRead;

use earshot_common::client::ServerMessage;
use earshot_common::receipt::ReceiptVerifier;

/// One final that did not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// 1-based line number.
    pub line: usize,
    /// Stable code (`earshot_common::receipt::Failure::code`, or `unreadable`).
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub finals: usize,
    pub verified: usize,
    pub rejected: Vec<Rejected>,
}

/// The most bytes one line may have (a final with words and a receipt is a
/// few KiB).
const MAX_LINE: usize = 1 << 20;

/// Checks every final in `input`.
pub fn verify(
    verifier: &ReceiptVerifier,
    input: impl BufRead,
    jurisdiction: Option<&str>,
) -> std::io::Result<Report> {
    let mut report = Report::default();
    let mut session_jurisdiction: Option<String> = None;
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        let number = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let reject = |code: &str, message: String| Rejected {
            line: number,
            code: code.to_owned(),
            message,
        };
        if line.len() > MAX_LINE {
            report.rejected.push(reject(
                "unreadable",
                format!("line is over {MAX_LINE} bytes"),
            ));
            continue;
        }
        match serde_json::from_str::<ServerMessage>(&line) {
            Ok(ServerMessage::Session(s)) => session_jurisdiction = Some(s.jurisdiction),
            Ok(ServerMessage::Final(f)) => {
                report.finals += 1;
                let expected = jurisdiction.or(session_jurisdiction.as_deref());
                match verifier.verify(&f, expected) {
                    Ok(()) => report.verified += 1,
                    Err(e) => report.rejected.push(reject(
                        e.code(),
                        format!("utterance {} from {}: {e}", f.utterance, f.region),
                    )),
                }
            }
            Ok(_) => {}
            Err(e) => report
                .rejected
                .push(reject("unreadable", format!("not a server message: {e}"))),
        }
    }
    Ok(report)
}
