//! A preview app: answers on $PORT with the standard library alone.
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

fn greeting(path: &str) -> String {
    format!("hello from rust at {path}\n")
}

fn main() {
    let port = std::env::var("PORT").unwrap_or_else(|_| "8000".into());
    let listener = TcpListener::bind(format!("127.0.0.1:{port}")).expect("bind $PORT");
    for stream in listener.incoming().flatten() {
        let mut reader = BufReader::new(&stream);
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).is_err() {
            continue;
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut line = String::new();
        while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
            line.clear();
        }
        let body = greeting(&path);
        let _ = write!(&stream, "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn greets_the_path() {
        assert_eq!(super::greeting("/x"), "hello from rust at /x\n");
    }
}
