//! One local HTTP/1.1 stub server for the tests that talk to a network service (a data mirror,
//! the Hugging Face hub, an OpenAI or Ollama judge): it answers each request with what the
//! test's handler returns and records every request it read.
use anyhow::Result;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A request as the stub read it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// The request target, e.g. `/v1/chat/completions`.
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The last path segment (a file name for the hub's `.../resolve/main/<file>`).
    pub fn file_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or("")
    }
}

/// What the stub answers: a status, extra headers and a body (`Content-Length` and
/// `Connection: close` are added), optionally only after a delay.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Answer this long after the request, without holding up the next one (a server slower
    /// than the client's timeout).
    pub delay: Option<Duration>,
}

impl Response {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
            delay: None,
        }
    }

    /// 200 with `body`.
    pub fn ok(body: impl Into<Vec<u8>>) -> Self {
        Self::new(200, body)
    }

    /// 404 with an empty body.
    pub fn not_found() -> Self {
        Self::new(404, Vec::new())
    }

    /// `status` with a JSON body (`Content-Type: application/json`).
    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self::new(status, body).header("Content-Type", "application/json")
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
}

/// A stub server on `127.0.0.1` and a free port.
pub struct HttpStub {
    url: String,
    requests: Arc<Mutex<Vec<Request>>>,
    thread: JoinHandle<()>,
}

impl HttpStub {
    /// Answers every connection with `handler` until the test process ends.
    pub fn serve(handler: impl FnMut(&Request) -> Response + Send + 'static) -> Result<Self> {
        Self::start(None, handler)
    }

    /// Answers `n` connections, then closes its port (a later request finds no server);
    /// [`HttpStub::join`] waits for that.
    pub fn serve_n(
        n: usize,
        handler: impl FnMut(&Request) -> Response + Send + 'static,
    ) -> Result<Self> {
        Self::start(Some(n), handler)
    }

    fn start(
        limit: Option<usize>,
        mut handler: impl FnMut(&Request) -> Response + Send + 'static,
    ) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}", listener.local_addr()?);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        let thread = std::thread::spawn(move || {
            for (i, stream) in listener.incoming().enumerate() {
                if let Some((stream, request)) =
                    stream.ok().and_then(|s| read_request(&s).map(|r| (s, r)))
                {
                    seen.lock().expect("stub lock").push(request.clone());
                    let response = handler(&request);
                    match response.delay {
                        Some(d) => {
                            std::thread::spawn(move || {
                                std::thread::sleep(d);
                                write_response(stream, &response);
                            });
                        }
                        None => write_response(stream, &response),
                    }
                }
                if limit.is_some_and(|n| i + 1 >= n) {
                    break; // drops the listener: the port is closed
                }
            }
        });
        Ok(Self {
            url,
            requests,
            thread,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn port(&self) -> u16 {
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a port in the stub's URL")
    }

    /// Every request read so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("stub lock").clone()
    }

    /// Waits until a [`HttpStub::serve_n`] stub has answered its connections and closed its port.
    pub fn join(self) {
        self.thread.join().expect("the stub server thread panicked");
    }
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut first = String::new();
    reader.read_line(&mut first).ok()?;
    let mut parts = first.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    let _ = reader.read_exact(&mut body);
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

fn write_response(mut stream: TcpStream, r: &Response) {
    let reason = match r.status {
        200 => "OK",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "Status",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", r.status);
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        r.body.len()
    ));
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&r.body);
}
