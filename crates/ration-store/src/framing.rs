//! Self-checking framing for snapshot bytes: every section carries its own SHA-256,
//! and a trailer hashes every byte that is not a payload (headers and section
//! hashes), so any damage is refused, the refusal says where, and each payload is
//! hashed once.
//!
//! Layout (integers little-endian):
//!
//! | bytes | what |
//! |---|---|
//! | 8 | magic: what the bytes are (`RATNSNAP` a snapshot file, `RATNBODY` its body) |
//! | 4 | format version (1) |
//! | 4 | number of sections |
//! | per section: 4 | tag (ASCII, e.g. `ledg`) |
//! | per section: 8 | payload length |
//! | per section: 32 | SHA-256 of the payload |
//! | per section: n | payload |
//! | 32 | SHA-256 of every byte above except the payloads |
//!
//! Every byte is covered by a check: payloads by their section's hash, header
//! fields and section hashes by parsing and by the trailer, the trailer by itself.

use sha2::{Digest, Sha256};

pub const VERSION: u32 = 1;
const HASH: usize = 32;

/// Why framed bytes were refused; the message names the place.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FrameError(pub String);

/// Frames `sections` (tag, payload) under `magic`.
pub fn frame(magic: &[u8; 8], sections: &[(&[u8; 4], &[u8])]) -> Vec<u8> {
    let len = 16 + HASH + sections.iter().map(|(_, p)| 4 + 8 + HASH + p.len()).sum::<usize>();
    let mut out = Vec::with_capacity(len);
    let mut trailer = Sha256::new();
    let mut header = |out: &mut Vec<u8>, bytes: &[u8]| {
        out.extend_from_slice(bytes);
        trailer.update(bytes);
    };
    header(&mut out, magic);
    header(&mut out, &VERSION.to_le_bytes());
    header(&mut out, &(sections.len() as u32).to_le_bytes());
    for (tag, payload) in sections {
        header(&mut out, *tag);
        header(&mut out, &(payload.len() as u64).to_le_bytes());
        header(&mut out, &Sha256::digest(payload));
        out.extend_from_slice(payload);
    }
    out.extend_from_slice(&trailer.finalize());
    out
}

/// Checks framed bytes and returns their payloads, in the order of `tags` (which
/// must be exactly the sections present, in order). `what` names the bytes in
/// errors ("snapshot file", "snapshot body").
pub fn unframe<'a>(
    what: &str,
    magic: &[u8; 8],
    tags: &[&[u8; 4]],
    bytes: &'a [u8],
) -> Result<Vec<&'a [u8]>, FrameError> {
    let fail = |m: String| FrameError(format!("{what} is damaged or not a Ration snapshot: {m}"));
    if bytes.len() < 16 + HASH {
        return Err(fail(format!("{} bytes is too short for the header and trailer", bytes.len())));
    }
    if &bytes[..8] != magic {
        return Err(fail(format!(
            "bytes 0..8 are {:?}, expected the magic {:?}",
            String::from_utf8_lossy(&bytes[..8]),
            String::from_utf8_lossy(magic)
        )));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
    if version != VERSION {
        return Err(fail(format!("bytes 8..12: format version {version}, expected {VERSION}")));
    }
    let count = u32::from_le_bytes(bytes[12..16].try_into().unwrap_or_default());
    if count as usize != tags.len() {
        return Err(fail(format!("bytes 12..16: {count} sections, expected {}", tags.len())));
    }
    let body_end = bytes.len() - HASH;
    let mut trailer = Sha256::new();
    trailer.update(&bytes[..16]);
    let mut at = 16usize;
    let mut payloads = Vec::with_capacity(tags.len());
    for (i, tag) in tags.iter().enumerate() {
        let header_end = at + 4 + 8 + HASH;
        if header_end > body_end {
            return Err(fail(format!(
                "section {i} header at bytes {at}..{header_end} runs past the end of the data ({body_end})"
            )));
        }
        if &bytes[at..at + 4] != *tag {
            return Err(fail(format!(
                "bytes {at}..{}: section {i} is tagged {:?}, expected {:?}",
                at + 4,
                String::from_utf8_lossy(&bytes[at..at + 4]),
                String::from_utf8_lossy(*tag)
            )));
        }
        let name = String::from_utf8_lossy(*tag);
        let len = u64::from_le_bytes(bytes[at + 4..at + 12].try_into().unwrap_or_default());
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| header_end.checked_add(l))
            .filter(|e| *e <= body_end)
            .ok_or_else(|| {
                fail(format!(
                    "bytes {}..{}: section {name:?} claims {len} bytes, past the end of the data ({body_end})",
                    at + 4,
                    at + 12
                ))
            })?;
        trailer.update(&bytes[at..header_end]);
        let payload = &bytes[header_end..end];
        if Sha256::digest(payload).as_slice() != &bytes[at + 12..header_end] {
            return Err(fail(format!(
                "section {name:?} (bytes {header_end}..{end}, or its checksum at bytes {}..{header_end}) does not match its checksum",
                at + 12
            )));
        }
        payloads.push(payload);
        at = end;
    }
    if at != body_end {
        return Err(fail(format!(
            "{} unexpected bytes after the last section, at {at}..{body_end}",
            body_end - at
        )));
    }
    if trailer.finalize().as_slice() != &bytes[body_end..] {
        return Err(fail(format!(
            "the header checksum (bytes {body_end}..{}) does not match: a header or that checksum is damaged",
            bytes.len()
        )));
    }
    Ok(payloads)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: &[u8; 8] = b"RATNTEST";
    const TAGS: [&[u8; 4]; 3] = [b"head", b"ledg", b"audt"];

    fn sample() -> Vec<u8> {
        let ledger: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        frame(MAGIC, &[(TAGS[0], b"meta data"), (TAGS[1], &ledger), (TAGS[2], b"")])
    }

    #[test]
    fn round_trips() {
        let bytes = sample();
        let parts = unframe("test", MAGIC, &TAGS, &bytes).unwrap();
        assert_eq!(parts[0], b"meta data");
        assert_eq!(parts[1].len(), 300);
        assert!(parts[2].is_empty());
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        let bytes = sample();
        for byte in 0..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[byte] ^= 1 << bit;
                let e = unframe("test", MAGIC, &TAGS, &damaged)
                    .expect_err(&format!("a flip of bit {bit} of byte {byte} was accepted"));
                assert!(e.0.contains("bytes"), "the error does not say where: {e}");
            }
        }
    }

    #[test]
    fn truncation_and_extension_are_refused() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            assert!(unframe("test", MAGIC, &TAGS, &bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(unframe("test", MAGIC, &TAGS, &longer).is_err());
    }

    #[test]
    fn damage_in_a_payload_names_the_section() {
        let mut bytes = sample();
        let ledger_at = 16 + (4 + 8 + 32 + 9) + 4 + 8 + 32 + 100;
        bytes[ledger_at] ^= 0x10;
        let e = unframe("snapshot file", MAGIC, &TAGS, &bytes).unwrap_err();
        assert!(e.0.contains("section \"ledg\""), "{e}");
        assert!(e.0.starts_with("snapshot file is damaged"), "{e}");
    }
}
