//! A TCP relay the test controls, standing in for the network between an agent and the
//! server: [`Proxy::cut`] makes it a black hole (bytes stop flowing both ways, new
//! connections are accepted and left hanging, as when packets are dropped), and
//! [`Proxy::heal`] restores the path. Connections that lived through a cut are closed at
//! the heal, as both ends' keepalives will have declared them dead by then.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A running relay on 127.0.0.1.
pub struct Proxy {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
    stop: CancellationToken,
}

impl Proxy {
    /// Relays a fresh loopback port to `upstream`.
    ///
    /// # Errors
    /// When the port cannot be bound.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(false);
        let stop = CancellationToken::new();
        let cut_tx = cut.clone();
        let stop_accept = stop.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stop_accept.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((client, _)) = accepted else { continue };
                let cut_rx = cut_tx.subscribe();
                let stop = stop_accept.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = relay(client, upstream, cut_rx) => {}
                    }
                });
            }
        });
        Ok(Self { addr, cut, stop })
    }

    /// Where agents should connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts dropping everything.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Restores the path (connections from before are closed).
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn wait_healed(cut: &mut watch::Receiver<bool>) {
    // An error only means the proxy is gone: stop waiting then too.
    let _ = cut.wait_for(|cut| !*cut).await;
}

async fn relay(mut client: TcpStream, upstream: SocketAddr, mut cut: watch::Receiver<bool>) {
    if *cut.borrow_and_update() {
        // A connection attempt into the black hole: it hangs until the heal, then dies.
        wait_healed(&mut cut).await;
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let mut up = vec![0u8; 64 * 1024];
    let mut down = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            changed = cut.changed() => {
                if changed.is_err() {
                    return;
                }
                if *cut.borrow_and_update() {
                    wait_healed(&mut cut).await;
                    return;
                }
            }
            read = client.read(&mut up) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => if server.write_all(&up[..n]).await.is_err() { return },
            },
            read = server.read(&mut down) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => if client.write_all(&down[..n]).await.is_err() { return },
            },
        }
    }
}
