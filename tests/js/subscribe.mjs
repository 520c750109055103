// Subscribes to environmentUpdated with the graphql-ws client and prints each payload as a JSON
// line; exits 0 after `count` updates, 1 on any error. Usage: node subscribe.mjs URL PROJECT COUNT
import { createClient } from 'graphql-ws';
import WebSocket from 'ws';

const [url, projectId, count] = process.argv.slice(2);
const client = createClient({ url, webSocketImpl: WebSocket, lazy: false, retryAttempts: 0 });
let received = 0;
client.on('connected', () => console.log(JSON.stringify({ connected: true })));
const unsubscribe = client.subscribe(
  {
    query: 'subscription($p: UUID) { environmentUpdated(projectId: $p) { id status position } }',
    variables: { p: projectId },
  },
  {
    next: (value) => {
      console.log(JSON.stringify(value));
      received += 1;
      if (received >= Number(count)) {
        unsubscribe();
        client.dispose();
        process.exit(0);
      }
    },
    error: (error) => {
      console.error(JSON.stringify(error));
      process.exit(1);
    },
    complete: () => {},
  },
);
setTimeout(() => {
  console.error('timed out');
  process.exit(1);
}, 60000);
