//! The readiness probe: does our redis-server answer on its port yet?

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// Socket timeouts of one readiness probe.
const PROBE_IO_TIMEOUT: Duration = Duration::from_millis(500);
/// The largest `INFO server` reply read; a longer one is not trusted to be ours.
const MAX_INFO_LEN: u64 = 1 << 20;

/// Whether the redis-server with process id `pid` answers on `127.0.0.1:<port>`.
///
/// Connects, sends `PING` and expects `+PONG` (or `-NOAUTH` when a `password` is set, then
/// `AUTH`), then checks through `INFO server` that the answering server is `pid` and not
/// someone else's on the same port. Any I/O error or other reply means "not yet".
pub(crate) fn answers(port: u16, password: Option<&str>, pid: u32) -> bool {
    matches!(try_probe(port, password, pid), Ok(true))
}

/// [`answers`] with I/O errors; `Ok(true)` means our server answered.
fn try_probe(port: u16, password: Option<&str>, pid: u32) -> io::Result<bool> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = TcpStream::connect_timeout(&addr, PROBE_IO_TIMEOUT)?;
    stream.set_read_timeout(Some(PROBE_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(PROBE_IO_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);

    writer.write_all(&resp_command(&["PING"]))?;
    let reply = read_line(&mut reader)?;
    let pong = reply.starts_with("+PONG");
    let noauth = password.is_some() && reply.starts_with("-NOAUTH");
    if !(pong || noauth) {
        // E.g. `-LOADING` while the append-only file is replayed.
        return Ok(false);
    }

    if let Some(password) = password {
        writer.write_all(&resp_command(&["AUTH", password]))?;
        if !read_line(&mut reader)?.starts_with("+OK") {
            // Someone else's server with another password.
            return Ok(false);
        }
    }
    writer.write_all(&resp_command(&["INFO", "server"]))?;
    let header = read_line(&mut reader)?;
    let Some(len) = header.strip_prefix('$').and_then(|n| n.parse::<u64>().ok()) else {
        // INFO unavailable (e.g. renamed by extra arguments): trust the PING, our child is alive.
        return Ok(true);
    };
    if len > MAX_INFO_LEN {
        return Ok(false);
    }
    let mut body = Vec::new();
    reader.take(len).read_to_end(&mut body)?;
    let body = String::from_utf8_lossy(&body);
    let answering_pid = body
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|value| value.trim().parse::<u32>().ok());
    Ok(answering_pid.is_none_or(|answering| answering == pid))
}

/// Reads one RESP line (without the CRLF); an empty read is an error.
fn read_line(reader: &mut impl BufRead) -> io::Result<String> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line.trim_end().to_owned())
}

/// Encodes `args` as a RESP array of bulk strings.
fn resp_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_command_encodes_bulk_strings() {
        assert_eq!(
            resp_command(&["AUTH", "pw"]),
            b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n".to_vec()
        );
    }

    #[test]
    fn nothing_listening_is_not_ready() {
        // Port 1 on loopback: nothing of ours listens there.
        assert!(!answers(1, None, std::process::id()));
    }
}
