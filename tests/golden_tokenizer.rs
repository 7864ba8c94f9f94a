//! Golden tests of the tokenizer and the chat template: every case of `tokenizer_cases.json`.

mod common;

use common::*;
use llada::candle_core::DType;
use llada::Message;

fn tokenizer() -> &'static llada::Tokenizer {
    model(DType::F32).tokenizer().unwrap()
}

#[test]
fn encode_decode_exact() {
    let Some(doc) = case_file("tokenizer_cases.json") else {
        return;
    };
    let tok = tokenizer();
    let strings = doc["strings"].as_array().unwrap();
    assert!(!strings.is_empty());
    for s in strings {
        let text = s["text"].as_str().unwrap();
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids, ids1(&s["ids"]), "ids of {text:?}");
        assert_eq!(
            ids,
            ids1(&s["ids_add_special_tokens_true"]),
            "nothing added for {text:?}"
        );
        let tokens: Vec<String> = ids.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
        let expected: Vec<String> = s["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        assert_eq!(tokens, expected, "tokens of {text:?}");
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            s["decoded"].as_str().unwrap(),
            "decode {text:?}"
        );
        assert_eq!(
            tok.decode(&ids, true).unwrap(),
            s["decoded_skip_special"].as_str().unwrap(),
            "decode skip special {text:?}"
        );
    }
}

#[test]
fn special_ids_match_meta() {
    let Some(doc) = case_file("tokenizer_cases.json") else {
        return;
    };
    let meta = &doc["meta"];
    let sp = model(DType::F32).special;
    assert_eq!(sp.mask as u64, meta["mask_id"].as_u64().unwrap());
    assert_eq!(sp.eos as u64, meta["eos_token_id"].as_u64().unwrap());
    assert_eq!(sp.pad as u64, meta["pad_token_id"].as_u64().unwrap());
    assert_eq!(sp.bos.map(|b| b as u64), meta["bos_token_id"].as_u64());
    assert_eq!(sp.eot.map(|b| b as u64), meta["eot_id"].as_u64());
    let tok = tokenizer();
    for (name, id) in meta["special_tokens"].as_object().unwrap() {
        assert_eq!(
            tok.encode(name).unwrap(),
            vec![id.as_u64().unwrap() as u32],
            "{name}"
        );
    }
}

#[test]
fn chat_template_exact() {
    let Some(doc) = case_file("tokenizer_cases.json") else {
        return;
    };
    let tok = tokenizer();
    let tmpl = tok
        .chat_template()
        .expect("golden tokenizer_config.json has a chat template");
    for c in doc["chat_template"].as_array().unwrap() {
        let msgs: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
        let name = c["name"].as_str().unwrap_or("");
        assert_eq!(
            tok.apply_chat_template(&msgs).unwrap(),
            c["text"].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(
            tok.encode_chat(&msgs).unwrap(),
            ids1(&c["ids"]),
            "{name} ids"
        );
        assert_eq!(
            tmpl.render(&msgs, false).unwrap(),
            c["text_with_add_generation_prompt_false"].as_str().unwrap(),
            "{name} add_generation_prompt=false"
        );
    }
}

#[test]
fn left_padded_batch_exact() {
    let Some(doc) = case_file("tokenizer_cases.json") else {
        return;
    };
    let b = &doc["left_padded_batch"];
    if b.is_null() {
        return;
    }
    let texts: Vec<&str> = b["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let (ids, mask) = tokenizer().encode_batch_left_padded(&texts).unwrap();
    assert_eq!(ids, ids2(&b["input_ids"]));
    assert_eq!(mask, ids2(&b["attention_mask"]));
}
