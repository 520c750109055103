// A preview app: answers on $PORT. An `Upgrade: echo` request switches to a raw echo stream,
// like a WebSocket would switch protocols.
const http = require("http");
const port = Number(process.env.PORT || 3000);
const server = http.createServer((req, res) => {
  res.writeHead(200, { "content-type": "text/plain" });
  res.end(`hello from node at ${req.url}\n`);
});
server.on("upgrade", (req, socket) => {
  if (req.headers.upgrade !== "echo") return socket.destroy();
  socket.write("HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n");
  socket.pipe(socket);
});
server.listen(port, "127.0.0.1", () => console.log(`listening on ${port}`));
