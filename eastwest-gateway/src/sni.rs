//! Reading the SNI from a ClientHello without terminating TLS.
//!
//! The gateway reads exactly one TLS record from the client, which must be a
//! ClientHello, and parses it with tls-parser. Those bytes are replayed to the
//! upstream unchanged, so the TLS session runs end to end between the two
//! sidecars and the gateway sees nothing beyond the ClientHello.

use tls_parser::{
    SNIType, TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_extensions,
    parse_tls_plaintext,
};
use tokio::io::{AsyncRead, AsyncReadExt};

/// TLS record header length.
const HEADER: usize = 5;
/// The largest plaintext record TLS allows.
const MAX_RECORD: usize = 16 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HelloError {
    #[error("client closed the connection before sending a ClientHello")]
    Closed,
    #[error("first record is not a TLS handshake (content type {0})")]
    NotHandshake(u8),
    #[error("TLS record of {0} bytes is larger than 16 KiB")]
    TooLarge(usize),
    #[error("first handshake message is not a ClientHello")]
    NotClientHello,
    #[error("ClientHello does not parse: {0}")]
    Malformed(String),
    #[error("ClientHello carries no server name")]
    NoSni,
    #[error("reading the ClientHello failed: {0}")]
    Io(String),
}

/// Reads the first record, returning it (to replay) and the SNI it names.
pub async fn read_client_hello<R: AsyncRead + Unpin>(
    conn: &mut R,
) -> Result<(Vec<u8>, String), HelloError> {
    let mut buf = vec![0u8; HEADER];
    conn.read_exact(&mut buf)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => HelloError::Closed,
            _ => HelloError::Io(e.to_string()),
        })?;
    if buf[0] != 0x16 {
        return Err(HelloError::NotHandshake(buf[0]));
    }
    let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if len > MAX_RECORD {
        return Err(HelloError::TooLarge(len));
    }
    buf.resize(HEADER + len, 0);
    conn.read_exact(&mut buf[HEADER..])
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => HelloError::Closed,
            _ => HelloError::Io(e.to_string()),
        })?;
    let sni = sni_of(&buf)?;
    Ok((buf, sni))
}

/// The SNI host name in a complete ClientHello record.
pub fn sni_of(record: &[u8]) -> Result<String, HelloError> {
    let (_, plaintext) =
        parse_tls_plaintext(record).map_err(|e| HelloError::Malformed(format!("{e:?}")))?;
    let Some(TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello))) =
        plaintext.msg.first()
    else {
        return Err(HelloError::NotClientHello);
    };
    let ext = hello.ext.ok_or(HelloError::NoSni)?;
    let (_, extensions) =
        parse_tls_extensions(ext).map_err(|e| HelloError::Malformed(format!("{e:?}")))?;
    for e in extensions {
        if let TlsExtension::SNI(names) = e {
            for (kind, name) in names {
                if kind == SNIType::HostName {
                    return std::str::from_utf8(name)
                        .map(str::to_string)
                        .map_err(|_| HelloError::Malformed("server name is not UTF-8".into()));
                }
            }
        }
    }
    Err(HelloError::NoSni)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn garbage_gets_a_reason_not_a_panic() {
        let cases: Vec<(Vec<u8>, HelloError)> = vec![
            (vec![], HelloError::Closed),
            (
                b"GET / HTTP/1.1\r\n\r\n".to_vec(),
                HelloError::NotHandshake(b'G'),
            ),
            (vec![0x16, 3, 1, 0xff, 0xff], HelloError::TooLarge(0xffff)),
            (vec![0x16, 3, 1, 0, 4, 1, 2, 3], HelloError::Closed),
        ];
        for (input, want) in cases {
            let got = read_client_hello(&mut input.as_slice())
                .await
                .expect_err("must fail");
            assert_eq!(got, want);
        }
        let junk = [0x16, 3, 1, 0, 4, 0xde, 0xad, 0xbe, 0xef];
        assert!(matches!(
            read_client_hello(&mut junk.as_slice()).await,
            Err(HelloError::Malformed(_) | HelloError::NotClientHello)
        ));
    }
}
