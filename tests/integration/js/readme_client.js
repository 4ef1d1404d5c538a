// Watch a flow's plays live, then trigger one: subscribe first, so no event is missed.
// Node.js 22+ (WebSocket and fetch built in; Node 20: node --experimental-websocket).
// In a logged-in browser page, leave out the token and the Authorization header.
const base = 'localhost:4454';
const flow = 'invoice-processing';
const token = process.env.FLOWPLAY_TOKEN; // an API key: POST /api/auth/api-keys

const ws = new WebSocket(`ws://${base}/api/ws?flowId=${flow}&token=${token}`);
const ended = new Set();
let playId = null;

ws.onmessage = (event) => {
  const msg = JSON.parse(event.data);
  if (msg.type.startsWith('play:layer:')) {
    const detail = msg.state === 'FAIL' ? msg.error : msg.out;
    console.log(`Step ${msg.ref} → ${msg.state}` + (detail === undefined ? '' : ` ${JSON.stringify(detail)}`));
  } else if (msg.type === 'play:state') {
    console.log(`Play ${msg.playId} is ${msg.state} (was ${msg.previousState})`);
  } else {
    console.log(`Play ${msg.playId} ${msg.type.slice('play:'.length)} (${msg.state})`);
  }
  if (msg.type === 'play:completed' || msg.type === 'play:failed') {
    ended.add(msg.playId);
    if (msg.playId === playId) ws.close();
  }
};

ws.onopen = async () => {
  const response = await fetch(`http://${base}/api/flows/${flow}/run`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ args: { invoiceId: 'INV-001' } }),
  });
  playId = (await response.json()).playId;
  console.log(`Triggered play ${playId}`);
  if (ended.has(playId)) ws.close(); // it finished before the answer arrived
};

// 4400 bad parameters, 4401 no or bad credentials, 4403 not yours (see the table below).
ws.onclose = (event) => {
  if (event.code >= 4000) {
    console.error(`Refused: ${event.code}`);
    process.exitCode = 1;
  }
};
