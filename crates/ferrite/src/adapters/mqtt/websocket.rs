//! MQTT over WebSocket: the byte stream that `connection.rs` reads and
//! writes, carried in binary WebSocket messages (MQTT 5 section 6, the same
//! for 3.1.1).
//!
//! [`WebSocketTransport`] turns a WebSocket into an `AsyncRead` and
//! `AsyncWrite` byte stream. Incoming messages are concatenated, so one
//! MQTT packet may span several messages and one message may contain
//! several packets ([MQTT-6.0.0-2], [MQTT-6.0.0-3]). A text message closes
//! the connection ([MQTT-6.0.0-1]). Each write becomes one binary message.
//!
//! [`serve_websocket`] runs the connection code of the TCP listener over
//! that stream, so authentication, topic rules, limits, sessions and
//! acknowledgements after the append are the same. The HTTP side
//! (`adapters/websocket/`) negotiates the `mqtt` subprotocol and takes the
//! connection slot before it upgrades.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::{Buf, Bytes};
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::{MqttServer, connection};

/// Time to send the closing frame after the MQTT connection has ended.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// WebSocket close code for data of a type the endpoint does not accept
/// (RFC 6455 section 7.4.1).
const CLOSE_UNSUPPORTED_DATA: u16 = 1003;
const CLOSE_NORMAL: u16 = 1000;

/// Reason the reading side of the WebSocket ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadEnd {
    /// A close frame arrived or the stream ended.
    PeerClosed,
    /// A text message arrived; MQTT takes binary messages only.
    TextMessage,
    Failed,
}

/// A WebSocket as the byte stream of one MQTT connection.
///
/// Each write becomes one message, which the socket starts to send at
/// once. A message that the socket cannot take completely stays in
/// tungstenite's buffer and is flushed by the next write, read or flush,
/// because the connection loop never calls `flush`. The next write waits
/// for it, so at most one message is buffered.
pub struct WebSocketTransport<S> {
    socket: S,
    /// The unread rest of the current binary message.
    incoming: Bytes,
    /// Set while a sent message is not yet completely flushed.
    unflushed: bool,
    read_end: Option<ReadEnd>,
    close_sent: bool,
}

impl<S> WebSocketTransport<S>
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message, Error = axum::Error> + Unpin,
{
    pub fn new(socket: S) -> Self {
        Self {
            socket,
            incoming: Bytes::new(),
            unflushed: false,
            read_end: None,
            close_sent: false,
        }
    }

    /// Sends the close frame once the MQTT connection has ended, bounded
    /// in time: 1003 after a text message, 1000 otherwise. When the client
    /// closed first, this flushes the reply to its close frame.
    pub async fn close(&mut self) {
        let code = match self.read_end {
            Some(ReadEnd::TextMessage) => CLOSE_UNSUPPORTED_DATA,
            Some(ReadEnd::Failed) => return,
            Some(ReadEnd::PeerClosed) | None => CLOSE_NORMAL,
        };
        let reason = if code == CLOSE_UNSUPPORTED_DATA {
            "MQTT over WebSocket takes binary messages only"
        } else {
            ""
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if self.read_end != Some(ReadEnd::PeerClosed) && !self.close_sent {
                self.close_sent = true;
                let frame = CloseFrame {
                    code,
                    reason: Utf8Bytes::from_static(reason),
                };
                self.socket.send(Message::Close(Some(frame))).await?;
            }
            self.socket.flush().await
        })
        .await;
    }

    /// Flushes the message that a write left in the socket's buffer.
    fn poll_flush_unflushed(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.unflushed {
            ready!(self.socket.poll_flush_unpin(cx)).map_err(to_io_error)?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }
}

fn to_io_error(error: axum::Error) -> io::Error {
    io::Error::other(error)
}

impl<S> AsyncRead for WebSocketTransport<S>
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message, Error = axum::Error> + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Reading goes on while the flush is pending; a failed flush ends
        // the connection.
        if let Poll::Ready(Err(error)) = this.poll_flush_unflushed(cx) {
            return Poll::Ready(Err(error));
        }

        loop {
            if !this.incoming.is_empty() {
                let count = this.incoming.len().min(buf.remaining());
                buf.put_slice(&this.incoming[..count]);
                this.incoming.advance(count);
                return Poll::Ready(Ok(()));
            }
            match this.read_end {
                // End of stream.
                Some(ReadEnd::PeerClosed) => return Poll::Ready(Ok(())),
                Some(ReadEnd::TextMessage) => return Poll::Ready(Err(text_message_error())),
                Some(ReadEnd::Failed) => {
                    return Poll::Ready(Err(io::Error::other("the WebSocket failed")));
                }
                None => {}
            }

            match ready!(this.socket.poll_next_unpin(cx)) {
                Some(Ok(Message::Binary(bytes))) => this.incoming = bytes,
                // tungstenite replies to pings itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Text(_))) => this.read_end = Some(ReadEnd::TextMessage),
                Some(Ok(Message::Close(_))) | None => this.read_end = Some(ReadEnd::PeerClosed),
                Some(Err(error)) => {
                    this.read_end = Some(ReadEnd::Failed);
                    return Poll::Ready(Err(to_io_error(error)));
                }
            }
        }
    }
}

fn text_message_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "a text message arrived; MQTT over WebSocket takes binary messages only",
    )
}

impl<S> AsyncWrite for WebSocketTransport<S>
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message, Error = axum::Error> + Unpin,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_flush_unflushed(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(this.socket.poll_ready_unpin(cx)).map_err(to_io_error)?;
        this.socket
            .start_send_unpin(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(to_io_error)?;

        // The message is accepted; an error of this first flush shows at
        // the next write, read or flush.
        this.unflushed = true;
        let _ = this.poll_flush_unflushed(cx);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_flush_unflushed(cx))?;
        this.socket.poll_flush_unpin(cx).map_err(to_io_error)
    }

    /// Sends a normal close frame (1000), as the TCP listener's connections
    /// shut down their sending side.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.close_sent {
            ready!(this.socket.poll_ready_unpin(cx)).map_err(to_io_error)?;
            let frame = CloseFrame {
                code: CLOSE_NORMAL,
                reason: Utf8Bytes::default(),
            };
            this.socket
                .start_send_unpin(Message::Close(Some(frame)))
                .map_err(to_io_error)?;
            this.close_sent = true;
        }
        this.socket.poll_flush_unpin(cx).map_err(to_io_error)
    }
}

/// Serves one MQTT connection over an upgraded WebSocket until it closes.
/// `slot` is the connection's place within `mqtt.max_connections`, taken
/// before the upgrade; `peer` is the TCP peer of the HTTP connection.
pub async fn serve_websocket<S>(
    socket: S,
    server: MqttServer,
    slot: OwnedSemaphorePermit,
    peer: SocketAddr,
) where
    S: Stream<Item = Result<Message, axum::Error>>
        + Sink<Message, Error = axum::Error>
        + Unpin
        + Send
        + 'static,
{
    // At error level, so that the ids stay on the warnings of the
    // connection whatever log level is configured.
    let span = tracing::error_span!(
        "mqtt_connection",
        %peer,
        transport = "websocket",
        client_id = tracing::field::Empty,
        device_id = tracing::field::Empty,
    );
    let shared = server.shared.clone();
    let task = async move {
        let mut transport = WebSocketTransport::new(socket);
        connection::run(&mut transport, shared, Some(peer.ip()), slot, None).await;
        transport.close().await;
    };
    server.track_connection(task.instrument(span)).await;
}

#[cfg(test)]
mod tests {
    use futures::channel::mpsc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A WebSocket stand-in: messages from the test, and a channel of the
    /// messages the transport sends.
    struct FakeSocket {
        incoming: futures::stream::Iter<std::vec::IntoIter<Result<Message, axum::Error>>>,
        outgoing: mpsc::UnboundedSender<Message>,
    }

    impl Stream for FakeSocket {
        type Item = Result<Message, axum::Error>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.incoming.poll_next_unpin(cx)
        }
    }

    impl Sink<Message> for FakeSocket {
        type Error = axum::Error;

        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
            self.outgoing.unbounded_send(item).map_err(axum::Error::new)
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
    }

    fn transport(
        messages: Vec<Message>,
    ) -> (
        WebSocketTransport<FakeSocket>,
        mpsc::UnboundedReceiver<Message>,
    ) {
        let (sender, receiver) = mpsc::unbounded();
        let socket = FakeSocket {
            incoming: futures::stream::iter(messages.into_iter().map(Ok).collect::<Vec<_>>()),
            outgoing: sender,
        };
        (WebSocketTransport::new(socket), receiver)
    }

    #[tokio::test]
    async fn binary_messages_read_as_one_stream() {
        let (mut transport, _) = transport(vec![
            Message::Binary(Bytes::from_static(&[0x10, 0x02])),
            Message::Ping(Bytes::new()),
            Message::Binary(Bytes::new()),
            Message::Binary(Bytes::from_static(&[0x00, 0x04, 0xC0, 0x00])),
        ]);

        let mut bytes = Vec::new();
        transport.read_to_end(&mut bytes).await.expect("read");
        assert_eq!(bytes, [0x10, 0x02, 0x00, 0x04, 0xC0, 0x00]);
    }

    #[tokio::test]
    async fn close_frame_ends_the_stream() {
        let (mut transport, _) = transport(vec![
            Message::Binary(Bytes::from_static(&[1, 2])),
            Message::Close(None),
            Message::Binary(Bytes::from_static(&[3])),
        ]);

        let mut bytes = Vec::new();
        transport.read_to_end(&mut bytes).await.expect("read");
        assert_eq!(bytes, [1, 2]);
    }

    #[tokio::test]
    async fn text_message_fails_the_read() {
        let (mut transport, mut sent) = transport(vec![Message::Text("hello".into())]);

        let error = transport
            .read_u8()
            .await
            .expect_err("a text message is an error");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);

        transport.close().await;
        match sent.next().await {
            Some(Message::Close(Some(frame))) => assert_eq!(frame.code, CLOSE_UNSUPPORTED_DATA),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }

    /// A socket whose flush stays pending until `flushable` is set, and
    /// which counts the messages sent.
    struct SlowSocket {
        sent: usize,
        flushable: bool,
    }

    impl Stream for SlowSocket {
        type Item = Result<Message, axum::Error>;

        fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            Poll::Pending
        }
    }

    impl Sink<Message> for SlowSocket {
        type Error = axum::Error;

        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn start_send(mut self: Pin<&mut Self>, _: Message) -> Result<(), Self::Error> {
            self.sent += 1;
            Ok(())
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            if self.flushable {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn write_waits_for_the_previous_flush() {
        let mut transport = WebSocketTransport::new(SlowSocket {
            sent: 0,
            flushable: false,
        });
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);

        let first = Pin::new(&mut transport).poll_write(&mut cx, &[1, 2, 3]);
        assert!(matches!(first, Poll::Ready(Ok(3))), "{first:?}");
        let second = Pin::new(&mut transport).poll_write(&mut cx, &[4]);
        assert!(second.is_pending(), "{second:?}");
        assert_eq!(transport.socket.sent, 1);

        // A read drives the pending flush, after which writing goes on.
        transport.socket.flushable = true;
        let mut buffer = [0u8; 4];
        let mut read_buf = ReadBuf::new(&mut buffer);
        let read = Pin::new(&mut transport).poll_read(&mut cx, &mut read_buf);
        assert!(read.is_pending(), "{read:?}");
        assert!(!transport.unflushed);
        let third = Pin::new(&mut transport).poll_write(&mut cx, &[4]);
        assert!(matches!(third, Poll::Ready(Ok(1))), "{third:?}");
        assert_eq!(transport.socket.sent, 2);
    }

    #[tokio::test]
    async fn each_write_is_one_binary_message() {
        let (mut transport, mut sent) = transport(Vec::new());

        transport
            .write_all(&[0x20, 0x02, 0x00, 0x00])
            .await
            .expect("write");
        transport.write_all(&[0xD0, 0x00]).await.expect("write");
        transport.shutdown().await.expect("shutdown");

        let first = sent.next().await.expect("first message");
        assert_eq!(
            first,
            Message::Binary(Bytes::from_static(&[0x20, 0x02, 0x00, 0x00]))
        );
        let second = sent.next().await.expect("second message");
        assert_eq!(second, Message::Binary(Bytes::from_static(&[0xD0, 0x00])));
        match sent.next().await {
            Some(Message::Close(Some(frame))) => assert_eq!(frame.code, CLOSE_NORMAL),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}
