// Peer 3: the counter server a Node.js user would write with the `ws` package.
//
// Same protocol as counter-sync: {"type": "users"|"state"|"error"} events out,
// {"action": "plus"|"minus"} in. Every join, leave and action broadcasts at
// once to every open client, as the `ws` README's broadcast example does.
//
// Run: node bench/peers/node_ws/server.js --host 127.0.0.1 --port 8765
'use strict';

const { WebSocketServer, WebSocket } = require('ws');

// The same listen backlog as the Python peers, so the join storm measures
// handshake work rather than SYN retransmit timers.
const BACKLOG = 4096;

function parseArgs(argv) {
  const options = { host: '127.0.0.1', port: 8765 };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (flag === '--host' && value !== undefined) options.host = value;
    else if (flag === '--port' && value !== undefined) options.port = Number(value);
    else {
      console.error('usage: node server.js [--host HOST] [--port PORT]');
      process.exit(2);
    }
  }
  return options;
}

const { host, port } = parseArgs(process.argv.slice(2));
let value = 0;

// perMessageDeflate off: the messages are tiny, and compression would only
// cost CPU and per-connection memory (the Python peers use compression=None).
const wss = new WebSocketServer({ host, port, backlog: BACKLOG, perMessageDeflate: false });

const usersEvent = () => JSON.stringify({ type: 'users', count: wss.clients.size });
const stateEvent = () => JSON.stringify({ type: 'state', value });
const errorEvent = (error) => JSON.stringify({ type: 'error', error });

function broadcast(message) {
  for (const client of wss.clients) {
    if (client.readyState === WebSocket.OPEN) client.send(message);
  }
}

function parseAction(data, isBinary) {
  if (isBinary) return null;
  try {
    const event = JSON.parse(data);
    return event !== null && typeof event === 'object' ? event.action : null;
  } catch {
    return null;
  }
}

wss.on('connection', (ws) => {
  // `ws` removes a closed client from wss.clients before our 'close' handler
  // runs, so both counts below are already right.
  broadcast(usersEvent());
  ws.send(stateEvent());
  ws.on('message', (data, isBinary) => {
    const action = parseAction(data, isBinary);
    if (action === 'plus') {
      value += 1;
      broadcast(stateEvent());
    } else if (action === 'minus') {
      value -= 1;
      broadcast(stateEvent());
    } else {
      ws.send(errorEvent('unsupported action'));
    }
  });
  ws.on('close', () => broadcast(usersEvent()));
  // Without a listener an 'error' event would crash the process.
  ws.on('error', () => {});
});

wss.on('listening', () => console.log(`listening on ${host}:${port}`));

process.on('SIGTERM', () => {
  for (const client of wss.clients) client.terminate();
  wss.close(() => process.exit(0));
});
