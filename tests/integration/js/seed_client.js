// The seed page's WebSocket client ("Real-time Monitoring via WebSocket" in
// seed/execution-and-plays.txt), run with Node.js by tests/integration/test_ws.py.
//
// The two seed lines between the markers are as written; the test only substitutes the
// server's host and port and appends ?token=<api key> (Node has no browser cookie jar).
// Around them, a harness: it reports OPEN, reads the play id to watch from stdin (the
// test triggers the play once the socket is open) and exits when that play has ended.
let targetPlayId = null;

// --- seed, as written ---
const ws = new WebSocket('ws://localhost:4454/api/ws');
ws.onmessage = (event) => { const msg = JSON.parse(event.data); if (msg.playId === targetPlayId) { console.log(`Step ${msg.ref} → ${msg.state}`, msg.out); }};
// --- end of seed ---

ws.addEventListener('open', () => console.log('OPEN'));
ws.addEventListener('message', (event) => {
  const msg = JSON.parse(event.data);
  if (msg.playId === targetPlayId && ['play:completed', 'play:failed'].includes(msg.type)) ws.close();
});
ws.addEventListener('close', () => process.exit(targetPlayId ? 0 : 2));
ws.addEventListener('error', (event) => { console.error('WebSocket error', event.message || ''); process.exit(1); });
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => { targetPlayId = chunk.trim(); });
