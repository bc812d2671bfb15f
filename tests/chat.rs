//! Chat templates render and tokenize exactly as transformers' `apply_chat_template` does.

mod common;

use common::{fixture, FIXTURES};
use pp::tokenizer::{Message, Tokenizer};
use serde_json::Value;

#[test]
fn chat_rendering_and_token_ids_match_transformers() {
    for name in FIXTURES {
        let meta: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(name).join("meta.json")).unwrap(),
        )
        .unwrap();
        let chat = &meta["chat"];
        let messages: Vec<Message> = serde_json::from_value(chat["messages"].clone()).unwrap();
        let tokenizer = Tokenizer::load(&fixture(name).join("hf")).unwrap();

        let rendered = tokenizer.render_chat(&messages, false).unwrap();
        assert_eq!(rendered, chat["rendered"].as_str().unwrap(), "{name}");

        let ids = tokenizer.encode_chat(&messages, false).unwrap();
        let expected: Vec<u32> = serde_json::from_value(chat["token_ids"].clone()).unwrap();
        assert_eq!(ids, expected, "{name}");

        let prompt = tokenizer.render_chat(&messages[..2], true).unwrap();
        assert_eq!(
            prompt,
            chat["generation_prompt"].as_str().unwrap(),
            "{name}"
        );
    }
}
